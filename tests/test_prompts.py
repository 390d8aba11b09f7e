"""Prompts P0-P7 against sentences written out by hand (Synthetic Boost, Adhikari et al. 2023), and the mask-shape classifier."""
import itertools

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull

from jaxboost.data import augment, phantom, prompts


def test_prompts_73_year_old_female_poor_4ch_es_myocardium():
    got = prompts.make_prompts("MYO", "4CH", "ES", "F", 73, "Poor", "oval")
    expected = [
        ["", ""],
        ["Myocardium of the heart.",
         "Myocardium in the cardiac ultrasound."],
        ["Myocardium in four-chamber view of the heart.",
         "Myocardium in four-chamber view in the cardiac ultrasound."],
        ["Myocardium in four-chamber view of the heart at end of the systole cycle.",
         "Myocardium in four-chamber view in the cardiac ultrasound at end of the systole cycle."],
        ["Myocardium in four-chamber view of the heart at end of the systole cycle of a female.",
         "Myocardium in four-chamber view in the cardiac ultrasound at end of the systole cycle of a female."],
        ["Myocardium in four-chamber view of the heart at end of the systole cycle of a seventy-three-year-old female.",
         "Myocardium in four-chamber view in the cardiac ultrasound at end of the systole cycle of a "
         "seventy-three-year-old female."],
        ["Myocardium in four-chamber view of the heart at end of the systole cycle of a seventy-three-year-old "
         "female with poor image quality.",
         "Myocardium in four-chamber view in the cardiac ultrasound at end of the systole cycle of a "
         "seventy-three-year-old female with poor image quality."],
        ["Myocardium of oval shape in four-chamber view of the heart at end of the systole cycle of a "
         "seventy-three-year-old female with poor image quality.",
         "Myocardium of oval shape in four-chamber view in the cardiac ultrasound at end of the systole cycle of "
         "a seventy-three-year-old female with poor image quality."],
    ]
    assert got == expected


def test_p7_matches_spec_example():
    got = prompts.make_prompts("LV", "2CH", "ED", "M", 73, "Good", "oval")
    assert got[7][1] == ("Left ventricular cavity of oval shape in two-chamber view in the cardiac ultrasound at end "
                         "of the diastole cycle of a seventy-three-year-old male with good image quality.")


def test_left_atrium_p2_and_p4_medium():
    got = prompts.make_prompts("LA", "2CH", "ED", "M", 41, "Medium", "circle")
    assert got[1][0] == "Left atrium cavity of the heart."
    assert got[4][0] == "Left atrium cavity in two-chamber view of the heart at end of the diastole cycle of a male."
    assert got[6][0].endswith("of a forty-one-year-old male with medium image quality.")


def test_synthetic_prompts_drop_image_quality():
    got = prompts.make_prompts("LV", "4CH", "ES", "F", 30, None, "triangle", drop_quality=True)
    assert got[6][0] == ("Left ventricular cavity of triangle shape in four-chamber view of the heart at end of the "
                         "systole cycle of a thirty-year-old female.")
    assert got[7] == got[6]
    assert all("quality" not in p for pair in got for p in pair)


def test_bad_prompt_values_raise():
    with pytest.raises(ValueError, match="'3CH'"):
        prompts.make_prompts("LV", "3CH", "ED", "M", 50, "Good", "oval")
    with pytest.raises(ValueError, match="quality"):
        prompts.make_prompts("LV", "2CH", "ED", "M", 50, None, "oval")


def _grid(n=120):
    return np.mgrid[0:n, 0:n].astype(float)


def _rotated(region_fn, angle_deg, n=120):
    rows, cols = _grid(n)
    a = np.deg2rad(angle_deg)
    y, x = rows - n / 2, cols - n / 2
    return region_fn(np.cos(a) * y - np.sin(a) * x, np.sin(a) * y + np.cos(a) * x)


@pytest.mark.parametrize("angle", [0, 30])
@pytest.mark.parametrize("shape,region", [
    ("oval", lambda y, x: (y / 45) ** 2 + (x / 25) ** 2 <= 1),
    ("circle", lambda y, x: y ** 2 + x ** 2 <= 35 ** 2),
    ("square", lambda y, x: (np.abs(y) <= 30) & (np.abs(x) <= 30)),
    ("rectangle", lambda y, x: (np.abs(y) <= 40) & (np.abs(x) <= 18)),
    ("triangle", lambda y, x: (y <= 30) & (np.abs(x) <= (y + 40) * 0.6)),
])
def test_mask_shape_classifies_drawn_shapes(shape, region, angle):
    assert prompts.mask_shape(_rotated(region, angle)) == shape


def test_mask_shape_of_myocardium_u_is_judged_by_its_outline():
    rows, cols = _grid()
    outer = ((rows - 50) / 45) ** 2 + ((cols - 60) / 25) ** 2 <= 1
    inner = ((rows - 50) / 38) ** 2 + ((cols - 60) / 18) ** 2 <= 1
    assert prompts.mask_shape(outer & ~inner & (rows < 85)) == "oval"
    assert prompts.mask_shape(np.zeros((8, 8))) == "oval"


def test_age_in_words():
    assert prompts.age_in_words(73) == "seventy-three"
    assert prompts.age_in_words(20) == "twenty"


# Ages whose number word starts with a vowel sound, written out by hand: eight, eleven, eighteen, eighty-*.
AN_AGES = {8, 11, 18, *range(80, 90)}


def test_age_article_follows_the_spoken_word_for_every_age_0_to_120():
    for age in range(121):
        p5 = prompts.make_prompts("LV", "2CH", "ED", "F", age, "Good", "oval")[5][0]
        article = "an" if age in AN_AGES else "a"
        assert f" of {article} {prompts.age_in_words(age)}-year-old female." in p5, (age, p5)
    assert prompts.make_prompts("LA", "4CH", "ES", "M", 86, "Poor", "oval")[7][0].endswith(
        "of an eighty-six-year-old male with poor image quality.")


def _reference_shape(region: np.ndarray) -> str:
    """mask_shape's rules written out plainly: largest 4-connected component, convex hull of every corner
    of every pixel, rotating calipers over each hull edge, every triangle of the (<= 40 subsampled) hull."""
    components, count = ndimage.label(region)
    if count == 0:
        return "oval"
    region = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    pixels = np.argwhere(region)
    corners = np.concatenate([pixels + d for d in ((0, 0), (0, 1), (1, 0), (1, 1))]).astype(float)
    poly = corners[ConvexHull(corners).vertices]
    x, y = poly[:, 1], poly[:, 0]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    best = None
    for a, b in zip(poly, np.roll(poly, -1, 0)):
        u = (b - a) / np.hypot(*(b - a))
        along, across = poly @ u, poly @ np.array([-u[1], u[0]])
        sides = (np.ptp(along), np.ptp(across))
        if best is None or sides[0] * sides[1] < best[0] * best[1]:
            best = sides
    long_side, short_side = max(best), min(best)
    if len(poly) > 40:
        poly = poly[np.linspace(0, len(poly) - 1, 40).astype(int)]
    i, j, k = np.asarray(list(itertools.combinations(range(len(poly)), 3))).T
    (ay, ax), (by, bx) = (poly[j] - poly[i]).T, (poly[k] - poly[i]).T
    triangle = np.abs(ax * by - ay * bx).max() / 2
    if triangle / area > 0.8:
        return "triangle"
    if area / (long_side * short_side) > 0.9:
        return "square" if long_side / short_side < 1.2 else "rectangle"
    return "circle" if long_side / short_side < 1.2 else "oval"


def test_mask_shapes_match_the_plain_rules_on_1152_augmented_phantom_masks():
    # 384 augmented phantom masks x 3 structures: the fast hull (row-extreme corners, all labels of a mask
    # cropped and labelled at once) gives the word of the plain computation on every one.
    rng = np.random.default_rng(0)
    hearts = [phantom._draw_view(rng, phantom._patient_anatomy(rng), "4CH" if i % 2 else "2CH",
                                 "ED" if i % 4 < 2 else "ES", "Good", 128, 128)[1] for i in range(48)]
    rngs = [np.random.default_rng([3, i]) for i in range(384)]
    masks = augment.augment_batch(np.stack([hearts[i % 48] for i in range(384)])[..., None], rngs)[..., 0]
    for mask in masks:
        words = prompts.mask_shapes(mask, (1, 2, 3))
        assert words == {label: _reference_shape(mask == label) for label in (1, 2, 3)}


def test_mask_shapes_batch_is_mask_shapes_of_each_mask():
    # One batch of masks at different places and sizes (and one empty): each mask's words as if alone.
    rng = np.random.default_rng(1)
    hearts = [phantom._draw_view(rng, phantom._patient_anatomy(rng), "4CH" if i % 2 else "2CH", "ED", "Good",
                                 96, 96)[1] for i in range(6)]
    rngs = [np.random.default_rng([5, i]) for i in range(11)]
    masks = augment.augment_batch(np.stack([hearts[i % 6] for i in range(11)])[..., None], rngs)[..., 0]
    masks = np.concatenate([masks, np.zeros_like(masks[:1])])
    masks[3, :40] = 0  # a mask cut in half: another box than its neighbours'
    batch = prompts.mask_shapes_batch(masks, (1, 2, 3))
    assert batch == [{label: _reference_shape(m == label) for label in (1, 2, 3)} for m in masks]
    assert batch[-1] == {1: "oval", 2: "oval", 3: "oval"}


def test_hull_chains_are_qhulls_vertices():
    # The batched hull (integer chains) has exactly Qhull's vertices on augmented phantom regions at 192 px.
    rng = np.random.default_rng(2)
    hearts = [phantom._draw_view(rng, phantom._patient_anatomy(rng), "2CH", "ES", "Good", 192, 192)[1]
              for _ in range(4)]
    masks = augment.augment_batch(np.stack(hearts * 4)[..., None],
                                  [np.random.default_rng([7, i]) for i in range(16)])[..., 0]
    regions = np.stack([m == label for m in masks for label in (1, 2, 3)])
    present, left = regions.any(2), regions.argmax(2)
    right = regions.shape[2] - regions[:, :, ::-1].argmax(2)
    for plane, hull in enumerate(prompts._hull_chains(present, left, right)):
        rows = np.nonzero(present[plane])[0]
        if len(rows) == 0 or len(rows) != rows[-1] - rows[0] + 1:
            continue  # the test draws whole label planes: only connected-by-rows ones have one hull here
        qhull = prompts._hull_of_extremes(rows, left[plane, rows], right[plane, rows])
        assert sorted(map(tuple, hull.tolist())) == sorted(map(tuple, qhull.astype(int).tolist()))


def _qhull_words(mask: np.ndarray) -> dict:
    """The per-mask computation the batch replaces: the mask cropped to its labels' box (padded by one),
    each label's largest component, Qhull's hull of its rows' extreme corners, the measures in Qhull's order."""
    present = [label for label in (1, 2, 3) if (mask == label).any()]
    rows, cols = np.nonzero(np.isin(mask, present).any(1))[0], np.nonzero(np.isin(mask, present).any(0))[0]
    crop = np.pad(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1)
    words = {}
    for label in present:
        components, _ = ndimage.label(crop == label)
        region = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
        kept = np.nonzero(region.any(1))[0]
        words[label] = prompts._shape_of_extremes(kept, region[kept].argmax(1),
                                                  region.shape[1] - region[kept, ::-1].argmax(1))
    return words


def test_mask_shapes_batch_gives_qhulls_words_where_rectangles_tie():
    # Rotated ellipses, rectangles and triangles at 64 px: on a small pixel lattice two hull edges often give
    # bounding rectangles of exactly the same area but other sides, and the first in Qhull's vertex order
    # decides the word; the batch must give the per-mask (Qhull) word there too.
    rng = np.random.default_rng(123)
    yy, xx = np.mgrid[:64, :64]
    masks = np.zeros((64, 64, 64), np.uint8)
    for mask in masks:
        for label in (1, 2, 3):
            (cy, cx), (a, b) = rng.uniform(0.2, 0.8, 2) * 64, rng.uniform(0.05, 0.3, 2) * 64
            t = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
            v = (yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)
            mask[[(u / a) ** 2 + (v / b) ** 2 <= 1, (np.abs(u) <= a) & (np.abs(v) <= b),
                  (v >= -b) & (v <= b - 2 * b * np.abs(u) / a)][label - 1]] = label
    got = [w for start in range(0, 64, 8) for w in prompts.mask_shapes_batch(masks[start:start + 8])]
    for mask, words in zip(masks, got):
        assert {k: v for k, v in words.items() if (mask == k).any()} == _qhull_words(mask)


def test_a_tie_of_bounding_rectangles_takes_qhulls_word():
    # A 17-row region (from an augmented 64 px mask) whose hull has two edges with bounding rectangles of
    # exactly the same area (20 x 17 and 21.5 x 15.8): Qhull's vertex order picks the first, a circle; the
    # batched measures see the tie and leave the word to Qhull's order.
    rows = np.arange(37, 54)
    left = np.array([14, 11, 9, 8, 5, 4, 2, 2, 2, 2, 2, 2, 2, 3, 4, 6, 9])
    right = np.array([18, 19, 21, 21, 21, 21, 22, 22, 22, 21, 20, 20, 20, 19, 18, 16, 13])
    assert prompts._shape_of_extremes(rows, left, right) == "circle"
    present = np.zeros((1, 60), bool)
    present[0, rows] = True
    wide = np.zeros((1, 60), int)
    hull = prompts._hull_chains(present, wide + np.pad(left, (37, 6))[None], wide + np.pad(right, (37, 6))[None])[0]
    assert prompts._shapes_of_hulls([hull]) == [None]
    mask = np.zeros((64, 64), np.uint8)
    for r, lo, hi in zip(rows, left, right):
        mask[r - 1 + 10, lo - 1 + 10:hi - 1 + 10] = 3  # the region at some offset; its box is the crop
    assert prompts.mask_shapes_batch(mask[None])[0][3] == "circle"
