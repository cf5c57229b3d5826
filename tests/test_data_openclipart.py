"""openclipart captions: author stripping, collection titles, series grammar; the real set (slow)."""

import os
from collections import Counter, defaultdict

import pytest
from PIL import Image

from anybind.data.openclipart import list_openclipart, read_svg_meta
from anybind.data.openclipart_text import CaptionBuilder, ClipartMeta, clean_title, file_words

SVG = """<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><metadata><rdf:RDF><cc:Work rdf:about="">
<dc:title>{title}</dc:title><dc:description>{desc}</dc:description>
<dc:subject><rdf:Bag>{kws}</rdf:Bag></dc:subject>
<dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
</cc:Work></rdf:RDF></metadata></svg>"""


@pytest.mark.parametrize(
    "stem, creator, folder, words",
    [
        (
            "medicina_dottore_archite_01",
            "Architetto Francesco Rollandin",
            "science",
            "medicina dottore",
        ),
        (
            "provetta_plasma_sangue_a_01",
            "Architetto Francesco Rollandin",
            "science",
            "provetta plasma sangue",
        ),
        ("bullet_hole_linda_kim_ad", "Linda Kim", "", "bullet hole"),
        ("people_juliane_krug_04c", "Juliane Krug", "", "people"),
        ("baseball_bw_ganson", "Gerald G.", "", "baseball black and white"),
        ("azalea_0_symbol_1m_bwh", "Bryce W. Harrington", "", "azalea symbol"),
        ("star_57pt08step", "codifiedivining", "shapes/stars", "star with 57 points"),
        (
            "bordered_h_q",
            "Nicu Buculei",
            "recreation/games/cards/bordered",
            "queen of hearts playing card, bordered deck",
        ),
        ("arrow2-3-1", "x", "shapes", "arrow"),
        ("MatieresNocivesIrritantes", "yves GUILLOU", "", "matieres nocives irritantes"),
    ],
)
def test_file_words(stem, creator, folder, words):
    assert file_words(stem, creator, folder) == words


def test_clean_title():
    assert clean_title("Clipart by Nicu Buculei - smiley111", "Nicu Buculei") == "smiley"
    assert clean_title("clip_of_new_file", "someone") == "clip of new file"
    assert clean_title("Jupiter", "Dan Gerhards") == "Jupiter"


def test_collection_titles_give_way_to_file_names():
    metas = [
        ClipartMeta(
            f"computer/icons/{n}", "Lemon SVG theme", "", ["icon", "hash", ""], "Jose Hevia"
        )
        for n in ("lock", "edit_remove", "folder_home", "printer", "trash")
    ]
    metas += [
        ClipartMeta(f"people/yoga_{i:02d}", "Stylized Yoga Person", "", ["yoga"], "Gerald G.")
        for i in range(6)
    ]
    metas.append(
        ClipartMeta(
            "science/jupiter_dan_gerhards_01",
            "Jupiter",
            "The Planet Jupiter",
            ["astronomy", "planet", "jupiter"],
            "Dan Gerhards",
        )
    )
    b = CaptionBuilder(metas)
    assert b.is_collection("Lemon SVG theme") and not b.is_collection("Stylized Yoga Person")
    assert b.captions(metas[1]) == ["edit remove"]  # noise keywords dropped, title dropped
    assert b.captions(metas[5]) == ["Stylized Yoga Person"]  # a shared title that still describes
    assert b.captions(metas[-1]) == ["Jupiter, astronomy, planet", "The Planet Jupiter"]
    keys = [set(b.group_keys(m, b.captions(m)[0])) for m in metas]
    assert any(k.startswith("title:") for k in keys[0]) and keys[0] & keys[1]  # one collection


def test_listing_a_small_tree(tmp_path):
    for rel, title, kws in [
        ("animals/birds/owl_01", "Owl", ["bird", "night"]),
        ("animals/birds/owl_02", "Owl", ["bird", "night"]),
        ("food/apple_nicu_buculei_01", "apple", ["fruit"]),
    ]:
        for kind in ("png", "svg"):
            (tmp_path / kind / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "png" / f"{rel}.png")
        kw = "".join(f"<rdf:li>{k}</rdf:li>" for k in kws)
        (tmp_path / "svg" / f"{rel}.svg").write_text(
            SVG.format(title=title, desc="", kws=kw, creator="Nicu Buculei")
        )
    meta = read_svg_meta(tmp_path / "svg" / "food/apple_nicu_buculei_01.svg", "x")
    assert (meta.title, meta.keywords, meta.creator) == ("apple", ["fruit"], "Nicu Buculei")
    idx = list_openclipart(tmp_path)
    rows = {
        i: (c, lab, g)
        for i, c, lab, g in zip(
            idx.item_ids,
            idx.column("caption"),
            idx.column("label"),
            idx.column("group"),
            strict=True,
        )
    }
    assert rows["food/apple_nicu_buculei_01"][:2] == (["apple, fruit"], "food")
    assert (
        rows["animals/birds/owl_01"][2] == rows["animals/birds/owl_02"][2]
    )  # same caption and bytes
    assert idx.column("image")[0].endswith(".png") and idx.root == str(tmp_path / "png")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir("/usr/share/openclipart/png"),
    reason="apt-get install openclipart-png openclipart-svg",
)
def test_real_openclipart_captions_and_groups():
    idx = list_openclipart()
    assert len(idx) > 8000
    first = [c[0] for c in idx.column("caption")]
    counts = Counter(first)
    assert all(c.strip() for c in first)
    bad = {"gramastar", "card", "lemon svg theme", "etiquette icons", "various cliparts"}
    assert not any(
        c.lower() in bad or c.lower().startswith(("part of the flat icon", "clipart by"))
        for c in first
    )
    assert len(counts) / len(first) > 0.6  # raw titles: ~2,800 distinct for 8,121 images
    assert counts.most_common(1)[0][1] < 100
    assert not any("jean.victor.balin@" in c for caps in idx.column("caption") for c in caps)
    # groups: every collection and identical caption sits in one group, so in one split
    by_caption, by_group = defaultdict(set), defaultdict(set)
    for cap, g, s in zip(first, idx.column("group"), idx.column("split"), strict=True):
        by_caption[cap].add(g)
        by_group[g].add(s)
    assert all(len(gs) == 1 for gs in by_caption.values())
    assert all(len(ss) == 1 for ss in by_group.values())
    stars = {
        g
        for i, g in zip(idx.item_ids, idx.column("group"), strict=True)
        if i.startswith("shapes/stars/star_")
    }
    assert len(stars) == 1
    split = Counter(idx.column("split"))
    assert split["test"] > 200 and split["val"] > 200
    assert len(set(idx.column("label"))) == 22
