"""Emergent speech -> image retrieval: bind spoken captions onto a frozen image-text model, score them.

Per fold x seed: train the base image-text model (openclipart), add audio progressively onto its
frozen text space from (a) spoken openclipart train captions and (b) spoken WordNet glosses (no
openclipart item), then rank the fold's test images for each spoken caption (rendering 0) beside
the text that was spoken, the base's own captions, Whisper's transcript through the text side
(the cascade), training-free maps into the same space, and chance. Prints mean +- sd and the
emergence ratio (emergent recall / the same recall with the spoken text as the query).
The same as `anybind eval --speech ...`; this script only fixes the measured settings.

    python benchmarks/emergent_speech.py --speech openclipart-speech:3000 --disjoint wordnet-speech:2000 \\
        --folds 0,1,2,3,4 --seeds 0 --out runs/emergent-speech

Test items are the fold's test images that have a spoken caption (the speech subset's items).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from anybind.evaluate.emergent import emergent_protocol, format_summary, speech_setup, summarise


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speech", default="openclipart-speech:3000")
    p.add_argument("--disjoint", default="wordnet-speech:2000")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default="runs/emergent-speech")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    setup = speech_setup(speech=args.speech, disjoint=args.disjoint or None)
    folds = [None if f == "fixed" else int(f) for f in args.folds.split(",")]
    records = emergent_protocol(setup, folds, [int(s) for s in args.seeds.split(",")], Path(args.out))
    rows = summarise(records)
    Path(args.out, "summary.json").write_text(json.dumps(rows, indent=1))
    print(format_summary(rows))
    print(f"\n{len(records)} runs in {time.perf_counter() - t0:.0f} s; records: {args.out}/results.jsonl")


if __name__ == "__main__":
    main()
