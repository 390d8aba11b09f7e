"""Text prompts P0-P7 for one (image, structure) pair, exactly as the public synthetic-boost code (Adhikari et al. 2023).

Every prompt has two endings: the phrase "of the heart" or "in the cardiac ultrasound" follows the view
(P1: the structure name) and the sentence ends with a full stop. P7 adds "of {shape} shape" after the
structure name; the original asked a VQA model for the shape, ours measures it from the mask
(`mask_shape`). Synthetic images drop image quality (`drop_quality=True`): P6 and P7 are then
"{structure} of {shape} shape in {view} ... of a {age}-year-old {sex}." as in the original synthetic set.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np
from num2words import num2words
from scipy.spatial import ConvexHull, QhullError

from jaxboost.data.labels import STRUCTURE_NAMES

NUM_PROMPTS = 8
ENDINGS = ("of the heart", "in the cardiac ultrasound")
SHAPES = ("oval", "circle", "triangle", "square", "rectangle")
_VIEW_WORDS = {"2CH": "two", "4CH": "four"}
_CYCLE_WORDS = {"ED": "diastole", "ES": "systole"}
_SEX_WORDS = {"M": "male", "F": "female"}


@functools.lru_cache(maxsize=256)
def age_in_words(age: int) -> str:
    """73 -> 'seventy-three' (num2words, as the original prompts; cached: every record of a patient asks)."""
    return num2words(int(age))


def indefinite_article(words: str) -> str:
    """'an' before a vowel sound, else 'a'. Of the number words only eight (eighteen, eighty-...) and eleven
    begin with one ("one" is said "wun"): "an eighty-six-year-old", "a one-hundred-..."."""
    return "an" if words.startswith(("eight", "eleven")) else "a"


def make_prompts(structure: str, view: str, phase: str, sex: str, age: int, quality: str | None,
                 shape: str, *, drop_quality: bool = False) -> list[list[str]]:
    """All prompts for one sample: 8 lists [ending "of the heart", ending "in the cardiac ultrasound"].

    structure: "LV" | "MYO" | "LA"; view: "2CH" | "4CH"; phase: "ED" | "ES"; sex: "M" | "F";
    quality: "Good" | "Medium" | "Poor" (ignored when drop_quality); shape: one of SHAPES.
    """
    # Cached: a corpus repeats each patient's words for every image and structure (fresh lists each call).
    return [list(pair) for pair in _prompts(structure, view, phase, sex, int(age),
                                            None if drop_quality else quality, shape, drop_quality)]


@functools.lru_cache(maxsize=4096)
def _prompts(structure: str, view: str, phase: str, sex: str, age: int, quality: str | None, shape: str,
             drop_quality: bool) -> tuple:
    try:
        name, view_word = STRUCTURE_NAMES[structure], _VIEW_WORDS[view]
        cycle, sex_word = _CYCLE_WORDS[phase], _SEX_WORDS[sex]
    except KeyError as e:
        raise ValueError(f"make_prompts: unknown value {e.args[0]!r} (structure/view/phase/sex)") from None
    if not drop_quality and quality is None:
        raise ValueError("make_prompts: quality is required unless drop_quality=True")
    view_part = f"in {view_word}-chamber view"
    cycle_part = f" at end of the {cycle} cycle"
    sex_part = f" of a {sex_word}"
    age_words = age_in_words(age)
    age_sex_part = f" of {indefinite_article(age_words)} {age_words}-year-old {sex_word}"
    quality_part = "" if drop_quality else f" with {str(quality).lower()} image quality"
    shaped = f"{name} of {shape} shape"

    def both(head, tail):
        return [f"{head} {ending}{tail}." for ending in ENDINGS]

    prompts = [["", ""]]
    prompts.append(both(name, ""))
    prompts.append(both(f"{name} {view_part}", ""))
    prompts.append(both(f"{name} {view_part}", cycle_part))
    prompts.append(both(f"{name} {view_part}", cycle_part + sex_part))
    prompts.append(both(f"{name} {view_part}", cycle_part + age_sex_part))
    if drop_quality:  # the original synthetic P6: shape + view + cycle + age + sex
        prompts.append(both(f"{shaped} {view_part}", cycle_part + age_sex_part))
    else:
        prompts.append(both(f"{name} {view_part}", cycle_part + age_sex_part + quality_part))
    prompts.append(both(f"{shaped} {view_part}", cycle_part + age_sex_part + quality_part))
    return tuple(tuple(pair) for pair in prompts)


def _locally_convex(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points [K, 2] (x, y) of the chain y(x) that can be vertices of its lower hull: the ends, and those
    strictly below the midpoint of their two neighbours (a hull vertex has a supporting line touching only it,
    which both neighbours lie strictly above). Drops the collinear and concave ~3/4 of a digital outline."""
    keep = np.ones(len(y), bool)
    keep[1:-1] = 2 * y[1:-1] < y[:-2] + y[2:]
    return np.stack([x[keep], y[keep]], 1)


def _hull_of_extremes(rows: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray | None:
    """Convex hull [K, 2] (row, col) of the pixel squares of a connected region given, for each of its
    (contiguous) rows, its leftmost column and one past its rightmost.

    Only the outer corners of each row's leftmost and rightmost pixel can be hull vertices, and of the two
    corners on one pixel edge line (row r's bottom, row r + 1's top) only the outermost on each side, and of
    those only the locally convex ones: the same polygon from ~20x fewer points than the 4 corners of every
    edge pixel."""
    lines = rows[0] + np.arange(len(rows) + 1)
    lo = np.concatenate([left[:1], np.minimum(left[:-1], left[1:]), left[-1:]])
    hi = np.concatenate([right[:1], np.maximum(right[:-1], right[1:]), right[-1:]])
    corners = np.concatenate([_locally_convex(lines, lo), _locally_convex(lines, -hi) * [1, -1]]).astype(np.float64)
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return None
    return corners[hull.vertices]


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 1], poly[:, 0]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _min_area_rect(poly: np.ndarray) -> tuple[float, float]:
    """Side lengths (long, short) of the minimum-area bounding rectangle (rotating calipers over hull edges,
    all edges at once)."""
    edges = np.roll(poly, -1, axis=0) - poly
    norms = np.hypot(edges[:, 0], edges[:, 1])
    u = edges[norms > 0] / norms[norms > 0, None]
    pu = poly[:, :1] * u[:, 0] + poly[:, 1:] * u[:, 1]     # [K, E] projections on each edge direction
    pv = poly[:, :1] * -u[:, 1] + poly[:, 1:] * u[:, 0]    # ... and on its normal
    sides_u, sides_v = pu.max(0) - pu.min(0), pv.max(0) - pv.min(0)
    best = int(np.argmin(sides_u * sides_v))
    return (max(sides_u[best], sides_v[best]), min(sides_u[best], sides_v[best]))


@functools.lru_cache(maxsize=None)
def _triangle_pairs(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices into an [n, n] table of (i, j), (j, k) and (k, i) for every triangle i < j < k < n."""
    i, j, k = (np.asarray(c, np.intp) for c in zip(*itertools.combinations(range(n), 3)))
    return i * n + j, j * n + k, k * n + i


_MAX_TRIANGLE_VERTICES = 40


def _max_inscribed_triangle(poly: np.ndarray, max_vertices: int = _MAX_TRIANGLE_VERTICES) -> float:
    """Area of the largest triangle with vertices on the hull (hull subsampled to max_vertices points).

    Twice a triangle's area is p_i x p_j + p_j x p_k + p_k x p_i, so one [n, n] table of cross products gives
    every triangle i < j < k by indexing (pixel-corner coordinates are integers: the sums are exact)."""
    if len(poly) > max_vertices:
        poly = poly[np.linspace(0, len(poly) - 1, max_vertices).astype(int)]
    cross = (poly[:, None, 0] * poly[None, :, 1] - poly[:, None, 1] * poly[None, :, 0]).reshape(-1)
    ij, jk, ki = _triangle_pairs(len(poly))
    return float(np.abs(cross[ij] + cross[jk] + cross[ki]).max() / 2)


def mask_shapes(mask: np.ndarray, labels) -> dict:
    """{label: shape word of the region mask == label} for a multi-class mask [H, W] (mask_shape of each)."""
    return mask_shapes_batch(np.asarray(mask)[None], labels)[0]


def mask_shapes_batch(masks: np.ndarray, labels=(1, 2, 3)) -> list[dict]:
    """[{label: shape word}] for a batch of multi-class masks [B, H, W]: the horizontal runs of every plane
    (mask, label) from one pass over the masks, each plane's largest 4-connected component from the graph of
    runs that share a column with a run of the next row, its rows' extreme pixels, and the hulls from those
    extremes. The words are those of each mask cropped to the box of its labels, as mask_shapes measures it
    (coordinates enter the hull measures: same frame, same floating-point result)."""
    masks, labels = np.asarray(masks), list(labels)
    b, n = len(masks), len(labels)
    words = [{label: "oval" for label in labels} for _ in range(b)]
    if not n or not b:
        return words
    runs = _plane_runs(masks, labels)
    if not len(runs[0]):
        return words
    planes, present, left, right, offsets = _largest_components(*runs, masks.shape[2], n, b)
    poly, counts = _hull_polygons(present, left, right)
    label, image = np.divmod(planes, b)
    small = np.flatnonzero(counts <= _MAX_TRIANGLE_VERTICES)
    qhull = np.flatnonzero(counts > _MAX_TRIANGLE_VERTICES).tolist()  # the triangle subsamples Qhull's order
    if len(small):
        shifted = poly[small, :int(counts[small].max())] - offsets[small, None, :]
        for q, word in zip(small.tolist(), _polygon_words(shifted, counts[small])):
            if word is None:
                qhull.append(q)
            else:
                words[image[q]][labels[label[q]]] = word
    for q in qhull:
        kept = np.nonzero(present[q])[0]
        words[image[q]][labels[label[q]]] = _shape_of_extremes(kept - offsets[q, 0], left[q, kept] - offsets[q, 1],
                                                               right[q, kept] - offsets[q, 1])
    return words


def _plane_runs(masks: np.ndarray, labels: list):
    """Horizontal runs of pixels == labels[i] in masks [B, H, W], ordered by plane (i * B + image), row and
    column: (plane, row, start, one past the end), int64 arrays [N]. One pass finds where a row's value
    changes (each row padded with a value that is no label asked for); only those few pixels are matched
    against the labels."""
    b, h, w = masks.shape
    border = _border_value(masks.dtype, labels)
    if border is None:  # every value of the dtype asked for (or not an integer dtype): label indices instead
        masks, labels, border = _label_indices(masks, labels), list(range(1, len(labels) + 1)), 0
    padded = np.empty((b, h, w + 2), masks.dtype)
    padded[:, :, 0] = padded[:, :, -1] = border
    padded[:, :, 1:-1] = masks
    flat = padded.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1])  # between padded columns col and col + 1 of one row
    ends = []
    for values in (flat[change + 1], flat[change]):  # run starts (at col), then run ends (one past, at col)
        index = _label_indices(values, labels)
        at = np.flatnonzero(index)
        at = at[np.argsort(index[at], kind="stable")]  # by label; (image, row, column) within a label
        line, col = np.divmod(change[at], w + 2)
        image, row = np.divmod(line, h)
        ends.append(((index[at].astype(np.int64) - 1) * b + image, row, col))
    (plane, row, start), (_, _, end) = ends  # in each plane's row the k-th start and the k-th end make a run
    return plane, row, start, end


def _label_indices(values: np.ndarray, labels: list) -> np.ndarray:
    """values -> uint8 (int64 past 255 labels) i + 1 where values == labels[i] (the last such i), else 0."""
    index = np.zeros(values.shape, np.uint8 if len(labels) < 256 else np.int64)
    if values.dtype in (np.uint8, np.bool_) and all(isinstance(v, (int, np.integer, np.bool_)) for v in labels):
        table = np.zeros(256, index.dtype)
        for i, label in enumerate(labels):
            if 0 <= int(label) <= 255:
                table[int(label)] = i + 1
        return table[values.view(np.uint8)]
    for i, label in enumerate(labels):
        index[values == label] = i + 1
    return index


def _first_of_component(count: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[count] the smallest node of each node's connected component in the graph of edges (src, dst):
    every root hooked under the smallest root it has an edge to, then pointers followed to their roots, until
    no edge joins two roots (a chain of k runs takes one round and log2(k) jumps)."""
    parent = np.arange(count)
    while True:
        a, b = parent[src], parent[dst]
        apart = a != b
        if not apart.any():
            return parent
        np.minimum.at(parent, np.maximum(a, b)[apart], np.minimum(a, b)[apart])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def _border_value(dtype, labels):
    """A value of an integer (or bool) dtype that is none of the labels; None if there is none."""
    if dtype == np.bool_:
        candidates = [False, True]
    elif np.issubdtype(dtype, np.integer):
        candidates = range(min(len(labels) + 1, int(np.iinfo(dtype).max) + 1))
    else:
        return None
    asked = set(labels)
    return next((dtype.type(v) for v in candidates if v not in asked), None)


def _largest_components(plane, row, start, end, width: int, n: int, images: int):
    """Each plane's largest 4-connected component (the first in raster order of equal sizes, as argmax over
    raster-order labels) from its runs -> (planes [Q], present [Q, h], left [Q, h], one past right [Q, h],
    offsets [Q, 2]): rows and columns counted from the plane's box (h: the tallest box), and the offset of
    that box from its mask's frame (the box of all its labels, padded by one pixel)."""
    count = len(plane)
    line = plane * (int(row.max()) + 2) + row    # a row's key; the next row of the same plane is key + 1
    span = width + 1
    below = (line + 1) * span
    lo = np.searchsorted(line * span + end, below + start, side="right")  # runs below that end past start ...
    hi = np.searchsorted(line * span + start, below + end, side="left")   # ... and start before end
    links = np.maximum(hi - lo, 0)
    src = np.repeat(np.arange(count), links)
    dst = lo[src] + np.arange(len(src)) - np.repeat(np.cumsum(links) - links, links)
    component = _first_of_component(count, src, dst)  # runs are in raster order: a component's first pixel
    sizes = np.bincount(component, weights=end - start, minlength=count)
    first = np.flatnonzero(component == np.arange(count))
    sizes, owner = sizes[first], plane[first]
    ranked = np.lexsort((first, -sizes, owner))
    best = ranked[np.concatenate([[True], owner[ranked][1:] != owner[ranked][:-1]])]  # [Q], by plane
    planes = owner[best]
    of_plane = np.full(int(planes.max()) + 1, -1)
    of_plane[planes] = np.arange(len(planes))
    q_all = of_plane[plane]
    heads = np.concatenate([[0], np.flatnonzero(plane[1:] != plane[:-1]) + 1])  # each plane's first run
    r0, r1 = row[heads], row[np.concatenate([heads[1:], [count]]) - 1] + 1
    c0 = np.minimum.reduceat(start, heads)
    kept = np.flatnonzero(component == first[best][q_all])
    firsts = np.concatenate([[True], line[kept][1:] != line[kept][:-1]])
    lasts = np.concatenate([firsts[1:], [True]])
    q, r = q_all[kept[firsts]], row[kept[firsts]] - r0[q_all[kept[firsts]]]
    present = np.zeros((len(planes), int((r1 - r0).max())), bool)
    left, right = np.zeros(present.shape, np.int64), np.zeros(present.shape, np.int64)
    present[q, r] = True
    left[q, r] = start[kept[firsts]] - c0[q]
    right[q, r] = end[kept[lasts]] - c0[q]
    corner = np.full((2, n * images), np.iinfo(np.int64).max)
    corner[:, planes] = r0, c0
    frame = corner.reshape(2, n, images).min(1)[:, planes % images]  # the box of all labels of its image
    offsets = (frame - 1 - np.stack([r0, c0])).T
    return planes, present, left, right, offsets


def _shapes_of_hulls(hulls: list[np.ndarray]) -> list[str | None]:
    """Shape words of hulls of at most _MAX_TRIANGLE_VERTICES vertices each (_polygon_words of them, each
    padded with copies of its last vertex)."""
    if not hulls:
        return []
    k = max(len(h) for h in hulls)
    poly = np.stack([np.concatenate([h, np.repeat(h[-1:], k - len(h), 0)]) for h in hulls])
    return _polygon_words(poly, np.asarray([len(h) for h in hulls]))


_WORDS = np.asarray([None, "oval", "triangle", "square", "rectangle", "circle"], object)


def _polygon_words(poly: np.ndarray, counts: np.ndarray) -> list[str | None]:
    """Shape words of hulls [Q, K, 2] with counts[q] vertices each, the rest copies of the last vertex
    (zero-length edges are skipped, a repeated vertex changes no extreme, no area and no largest triangle),
    all at once, every measure elementwise as _shape_of_hull takes it, so the same floats. The largest
    triangle is measured only where it could decide the word. None where two edges give bounding rectangles
    of exactly the same area but other sides (common on a small pixel lattice): the first in Qhull's vertex
    order wins there, so only Qhull's order gives the same word."""
    poly = poly.astype(np.float64)
    k = poly.shape[1]
    x, y = poly[..., 1], poly[..., 0]
    area = 0.5 * np.abs((x * np.roll(y, -1, 1)).sum(1) - (y * np.roll(x, -1, 1)).sum(1))  # exact: integers
    edges = np.roll(poly, -1, 1) - poly                                                  # [Q, E, 2]
    norms = np.hypot(edges[..., 0], edges[..., 1])
    u = edges / np.where(norms > 0, norms, 1)[..., None]
    pu = poly[:, None, :, 0] * u[:, :, None, 0] + poly[:, None, :, 1] * u[:, :, None, 1]     # [Q, E, K]
    pv = poly[:, None, :, 0] * -u[:, :, None, 1] + poly[:, None, :, 1] * u[:, :, None, 0]
    sides_u, sides_v = pu.max(2) - pu.min(2), pv.max(2) - pv.min(2)                      # [Q, E]
    rect = np.where(norms > 0, sides_u * sides_v, np.inf)
    best = np.argmin(rect, 1)
    su, sv = np.take_along_axis(sides_u, best[:, None], 1)[:, 0], np.take_along_axis(sides_v, best[:, None], 1)[:, 0]
    long_side, short_side = np.maximum(su, sv), np.minimum(su, sv)
    tied = rect == rect[np.arange(len(rect)), best][:, None]
    ambiguous = (tied & ((np.maximum(sides_u, sides_v) != long_side[:, None])
                         | (np.minimum(sides_u, sides_v) != short_side[:, None]))).any(1)
    # A triangle inside a rectangle covers at most half of it, so a hull whose rectangle's half is clearly
    # under 0.8 of its area cannot pass the triangle rule: its largest triangle is not needed.
    triangle = np.zeros(len(poly))
    maybe = np.nonzero(long_side * short_side / 2 > 0.8 * area * (1 - 1e-9))[0]
    if len(maybe):
        pm = poly[maybe]
        cross = (pm[:, :, None, 0] * pm[:, None, :, 1] - pm[:, :, None, 1] * pm[:, None, :, 0]).reshape(len(pm), -1)
        ij, jk, ki = _triangle_pairs(k)
        triangle[maybe] = np.abs(cross[:, ij] + cross[:, jk] + cross[:, ki]).max(1) / 2
    with np.errstate(divide="ignore", invalid="ignore"):  # degenerate hulls (fewer than 3 vertices): "oval"
        aspect = long_side / np.maximum(short_side, 1e-6)
        rule = np.select([triangle / area > 0.8, area / (long_side * short_side) > 0.9], [2, 3], 5)
    rule = np.where((rule >= 3) & (aspect >= 1.2), rule + 1, rule)  # square -> rectangle, circle -> oval
    rule = np.where(rule == 6, 1, rule)
    rule = np.where(counts < 3, 1, rule)
    return _WORDS[np.where(ambiguous, 0, rule)].tolist()


def _hull_chains(present: np.ndarray, left: np.ndarray, right: np.ndarray) -> list[np.ndarray]:
    """Convex hulls [K, 2] (row, col; integer corners, in no particular rotation) of several connected
    regions, each given by its rows' extreme pixels (present, left, one past right: [R, h])."""
    poly, counts = _hull_polygons(present, left, right)
    return [hull[:count] for hull, count in zip(poly, counts)]


def _hull_polygons(present: np.ndarray, left: np.ndarray, right: np.ndarray):
    """_hull_chains as one array [R, K, 2], each hull padded with copies of its last vertex, and the vertex
    count of each [R].

    Pixel edge line l of a region has its outermost corners at min(left[l - 1], left[l]) and
    max(right[l - 1], right[l]); the hull is the lower hull of the left chain (col over line) and the upper
    hull of the right chain, all chains at once in exact integer arithmetic; collinear points are dropped,
    as Qhull does."""
    r, h = present.shape
    big = np.iinfo(np.int64).max // 4
    pad = np.zeros((r, 1), bool)
    on = np.concatenate([present, pad], 1) | np.concatenate([pad, present], 1)          # [R, h + 1] lines
    # Both chains' rows, padded by a row that is not there at each end: [2R, h + 2]; the right chain
    # mirrored, so that its upper hull is a lower hull too.
    ends = np.full((2 * r, h + 2), big, np.int64)
    ends[:r, 1:-1] = np.where(present, left, big)
    ends[r:, 1:-1] = np.where(present, -right, big)
    y = np.minimum(ends[:, :-1], ends[:, 1:])                                                # [2R, h + 1]
    on = np.concatenate([on, on])
    # Locally convex: the ends, and points strictly below the midpoint of their (line) neighbours.
    keep = on.copy()
    keep[:, 1:-1] &= ~(on[:, :-2] & on[:, 2:]) | (2 * y[:, 1:-1] < y[:, :-2] + y[:, 2:])
    # Those few points of each chain, in order, side by side: [2R, K], then dropped, all chains at once,
    # while any is not strictly convex between its remaining neighbours (a run of such points is concave,
    # so it lies above the chord that replaces it; what is left is the lower hull).
    count = keep.sum(1)
    x = np.argsort(~keep, axis=1, kind="stable")[:, :int(count.max())]
    y = np.take_along_axis(y, x, 1)
    valid = np.arange(x.shape[1]) < count[:, None]
    valid = _drop_concave(x, y, valid)
    # Hull c: the lower chain's points in order, then the right chain's backwards; padded with the last.
    order = np.argsort(~valid, axis=1, kind="stable")
    x, y = np.take_along_axis(x, order, 1), np.take_along_axis(y, order, 1)
    lower, upper = valid[:r].sum(1, keepdims=True), valid[r:].sum(1, keepdims=True)
    at = np.arange(int((lower + upper).max()))[None]
    on_right = at >= lower
    chain = np.where(on_right, np.arange(r)[:, None] + r, np.arange(r)[:, None])
    point = np.where(on_right, np.maximum(upper - 1 - (at - lower), 0), at)
    poly = np.stack([x[chain, point], np.where(on_right, -y[chain, point], y[chain, point])], -1)
    return poly, (lower + upper)[:, 0]


def _drop_concave(x: np.ndarray, y: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """valid [C, K] (points (x, y) of C chains, in x order) less every point that is not strictly convex
    between its remaining neighbours, dropped all at once and again until none is; a chain with nothing to
    drop is done (its neighbours no longer change), so each round works on the chains still changing."""
    k = x.shape[1]
    idx = np.arange(k)
    active = np.arange(len(x))
    while len(active):
        xa, ya, va = x[active], y[active], valid[active]
        before = np.maximum.accumulate(np.where(va, idx, -1), 1)
        after = np.minimum.accumulate(np.where(va, idx, k)[:, ::-1], 1)[:, ::-1]
        prev = np.concatenate([np.full((len(active), 1), -1), before[:, :-1]], 1)
        nxt = np.concatenate([after[:, 1:], np.full((len(active), 1), k)], 1)
        base = k * np.arange(len(active))[:, None]
        p, q = base + np.clip(prev, 0, k - 1), base + np.clip(nxt, 0, k - 1)
        xf, yf = xa.reshape(-1), ya.reshape(-1)
        xp, yp = xf[p], yf[p]
        cross = (xa - xp) * (yf[q] - yp) - (ya - yp) * (xf[q] - xp)
        drop = va & (prev >= 0) & (nxt < k) & (cross <= 0)
        valid[active] = va & ~drop
        active = active[drop.any(1)]
    return valid


def mask_shape(mask: np.ndarray) -> str:
    """Shape word of a binary mask [H, W] from the geometry of its largest component's convex hull.

    The convex hull is used (not the region) so a U-shaped myocardium is judged by its outline.
    Measures, each 1.0 for its ideal shape:
      triangle_cover = largest inscribed triangle / hull area  (triangle 1.0, rectangle 0.5, ellipse 0.41)
      rect_fill      = hull area / minimum-area rectangle      (rectangle 1.0, ellipse 0.785)
      aspect         = long / short side of that rectangle
    Rules: triangle_cover > 0.8 -> triangle; else rect_fill > 0.9 -> square (aspect < 1.2) or rectangle;
    else circle (aspect < 1.2) or oval. An empty or degenerate mask gives "oval" (the common LV answer).
    """
    return mask_shapes(np.asarray(mask) > 0, (True,))[True]


def _shape_of_extremes(rows: np.ndarray, left: np.ndarray, right: np.ndarray) -> str:
    """Shape word of a connected region given by its rows' extreme pixels (see _hull_of_extremes)."""
    return _shape_of_hull(_hull_of_extremes(rows, left, right))


def _shape_of_hull(poly: np.ndarray | None) -> str:
    if poly is None or len(poly) < 3:
        return "oval"
    area = _polygon_area(poly)
    long_side, short_side = _min_area_rect(poly)
    aspect = long_side / max(short_side, 1e-6)
    if _max_inscribed_triangle(poly) / area > 0.8:
        return "triangle"
    if area / (long_side * short_side) > 0.9:
        return "square" if aspect < 1.2 else "rectangle"
    return "circle" if aspect < 1.2 else "oval"
