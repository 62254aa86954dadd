"""Rendering of one image of the synthetic shapes dataset.

An image is a textured, noisy background with a few filled shapes of random
class, colour, scale and rotation drawn on top of each other. Every random
choice comes from the ``numpy.random.Generator`` passed in, so an image is a
pure function of its generator's state (see
:func:`mmdet_deform.datasets.shapes_generator.image_rng`).

Boxes are the tight boxes of the *visible* pixels of each shape (as COCO's
boxes are of the visible object): a shape may be partly hidden by the shapes
drawn after it, but never by more than ``max_occlusion`` of its area.
"""

import math
from dataclasses import asdict, dataclass
from typing import List, Tuple

import cv2
import numpy as np

#: The shape classes, in label order (COCO category id = label + 1).
SHAPE_CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'star', 'ring', 'cross')

_SUBPIXEL_SHIFT = 4  # cv2 draws polygons with 4 fractional bits of precision
_SUBPIXEL = 1 << _SUBPIXEL_SHIFT


@dataclass(frozen=True)
class ShapesRenderParams:
    """How the images of a split look.

    Args:
        img_size (int): Height and width of every image, in pixels.
        min_objects (int): Fewest shapes placed in an image (an image may hold
            fewer when placements keep colliding).
        max_objects (int): Most shapes placed in an image.
        min_size (float): Smallest shape size (diameter of its circumscribed
            circle), in pixels.
        max_size (float): Largest shape size, in pixels. Sizes are drawn
            log-uniformly in ``[min_size, max_size]``, so small, medium and
            large objects are about equally frequent.
        max_occlusion (float): Largest fraction of a shape's area that shapes
            drawn later may hide, in ``[0, 1)``.
        noise_std (float): Standard deviation of the largest pixel noise added
            to the whole image (each image draws its own level up to this).
    """

    img_size: int = 320
    min_objects: int = 2
    max_objects: int = 8
    min_size: float = 12.0
    max_size: float = 160.0
    max_occlusion: float = 0.4
    noise_std: float = 12.0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f'{name} must be {expected}, got {getattr(self, name)!r}')

        need(isinstance(self.img_size, int) and self.img_size >= 32, 'img_size', 'an int >= 32')
        ints = isinstance(self.min_objects, int) and isinstance(self.max_objects, int)
        need(ints and self.min_objects >= 0, 'min_objects', 'an int >= 0')
        need(
            ints and self.max_objects >= max(self.min_objects, 1),
            'max_objects',
            f'an int >= max(min_objects, 1) = {max(self.min_objects, 1)}',
        )
        need(self.min_size >= 4, 'min_size', '>= 4 pixels')
        need(
            self.min_size <= self.max_size <= self.img_size - 4,
            'max_size',
            f'in [min_size, img_size - 4] = [{self.min_size}, {self.img_size - 4}]',
        )
        need(0 <= self.max_occlusion < 1, 'max_occlusion', 'in [0, 1)')
        need(self.noise_std >= 0, 'noise_std', '>= 0')

    def to_dict(self) -> dict:
        return asdict(self)


def _polygon(cls_name: str, radius: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices of a polygonal shape inscribed in a circle of ``radius``.

    Returns:
        np.ndarray: Vertices around the origin, shape (num_vertices, 2), (x, y).
    """
    if cls_name == 'square':
        theta = np.arange(4) * (math.pi / 2) + math.pi / 4
        pts = np.stack([np.cos(theta), np.sin(theta)], 1) * radius
    elif cls_name == 'triangle':
        theta = np.arange(3) * (2 * math.pi / 3) - math.pi / 2
        pts = np.stack([np.cos(theta), np.sin(theta)], 1) * radius
    elif cls_name == 'star':
        inner = radius * rng.uniform(0.38, 0.5)
        theta = np.arange(10) * (math.pi / 5) - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, radius, inner)
        pts = np.stack([np.cos(theta) * r, np.sin(theta) * r], 1)
    elif cls_name == 'cross':
        half = radius * rng.uniform(0.22, 0.34)  # half the arm width
        arm = math.sqrt(radius**2 - half**2)  # arm corners lie on the circle
        pts = np.array(
            [[half, half], [arm, half], [arm, -half], [half, -half], [half, -arm], [-half, -arm],
             [-half, -half], [-arm, -half], [-arm, half], [-half, half], [-half, arm], [half, arm]]
        )  # fmt: skip
    else:
        raise ValueError(f'not a polygonal shape class: {cls_name!r}')
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T


def shape_alpha(
    cls_name: str, size: float, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """Draw one shape of ``size`` pixels, anti-aliased, on a square canvas.

    Args:
        cls_name (str): One of :data:`SHAPE_CLASSES`.
        size (float): Diameter of the shape's circumscribed circle, in pixels.
        rng (np.random.Generator): Source of the rotation and proportions.

    Returns:
        tuple[np.ndarray, np.ndarray]: ``alpha``, the coverage in [0, 1] of
        each canvas pixel, shape (s, s) float32 with ``s = ceil(size) + 2``,
        and ``mask = alpha > 0.5``, shape (s, s) bool.
    """
    side = int(math.ceil(size)) + 2
    radius = size / 2
    angle = rng.uniform(0, 2 * math.pi)
    if cls_name in ('circle', 'ring'):
        # exact coverage from the distance to the centre (cv2's circles are polygons)
        coords = np.arange(side, dtype=np.float32) + np.float32(0.5 - side / 2)
        dist = np.sqrt(coords[None, :] ** 2 + coords[:, None] ** 2)  # (side, side)
        alpha = np.clip(radius + 0.5 - dist, 0, 1)
        if cls_name == 'ring':
            inner = radius * rng.uniform(0.45, 0.65)
            alpha = np.minimum(alpha, np.clip(dist - inner + 0.5, 0, 1))
        return alpha, alpha > 0.5
    pts = _polygon(cls_name, radius, angle, rng) + side / 2  # centred on the canvas
    pts = np.round(pts * _SUBPIXEL).astype(np.int32)
    canvas = np.zeros((side, side), np.uint8)
    cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA, _SUBPIXEL_SHIFT)
    alpha = canvas.astype(np.float32) / 255.0
    return alpha, alpha > 0.5


def _planes(plane: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``plane[..., None] * scale`` via cv2 (numpy broadcasts a trailing 3 slowly).

    Args:
        plane (np.ndarray): Shape (h, w), float32.
        scale (np.ndarray): Shape (3,), one factor per channel.

    Returns:
        np.ndarray: Shape (h, w, 3), float32.
    """
    return cv2.merge([plane * np.float32(c) for c in scale])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: a smooth two-colour field, a texture, clutter.

    Returns:
        np.ndarray: The image, shape (size, size, 3) float32 in about [0, 255]
        (BGR).
    """
    c0, c1 = rng.uniform(0, 255, (2, 3))
    grid = rng.random((int(rng.integers(2, 6)), int(rng.integers(2, 6))), np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    img = _planes(field, c1 - c0) + c0.astype(np.float32)  # (size, size, 3)
    kind = int(rng.integers(3))
    amp = rng.uniform(8, 30)
    if kind == 0:  # stripes at a random angle and period
        theta, period = rng.uniform(0, math.pi), rng.uniform(6, 30)
        freq = 2 * math.pi / period
        xx = np.arange(size, dtype=np.float32)[None, :] * np.float32(freq * math.cos(theta))
        yy = np.arange(size, dtype=np.float32)[:, None] * np.float32(freq * math.sin(theta))
        img += _planes(np.sin(xx + yy), rng.uniform(0.3, 1.0, 3) * amp)  # (1, s) + (s, 1)
    elif kind == 1:  # mid-frequency blotches
        cells = int(rng.integers(12, 40))
        blot = rng.standard_normal((cells, cells, 3), np.float32) * np.float32(amp)
        img += cv2.resize(blot, (size, size), interpolation=cv2.INTER_LINEAR)
    else:  # checkerboard
        cell = rng.uniform(8, 32)
        parity = (np.arange(size) // cell).astype(np.int8) % 2  # (size,)
        checker = (parity[None, :] ^ parity[:, None]).astype(np.float32) * 2 - 1  # (s, s)
        img += _planes(checker, np.full(3, amp))
    for _ in range(int(rng.integers(0, 7))):  # thin clutter lines (not objects)
        p, q = rng.integers(0, size, (2, 2))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(img, tuple(map(int, p)), tuple(map(int, q)), colour, int(rng.integers(1, 3)))
    return img


def _pick_colour(rng: np.random.Generator, avoid: List[np.ndarray]) -> np.ndarray:
    """Of a few random colours, the one farthest from every colour in ``avoid``."""
    candidates = rng.uniform(0, 255, (8, 3))
    dist = np.min([np.linalg.norm(candidates - a, axis=1) for a in avoid], axis=0)
    return candidates[int(np.argmax(dist))]


def render_shapes_image(
    rng: np.random.Generator, params: ShapesRenderParams, return_owner: bool = False
) -> Tuple[np.ndarray, ...]:
    """Render one image and its objects.

    Args:
        rng (np.random.Generator): The image's own random generator.
        params (ShapesRenderParams): How the image looks.
        return_owner (bool): Also return the map of which object each pixel
            shows.

    Returns:
        tuple: ``(img, objects)`` or ``(img, objects, owner)``. ``img``: shape
        (H, W, 3) uint8 BGR. ``objects``: one dict per object, in drawing
        order, with ``label`` (index into :data:`SHAPE_CLASSES`), ``bbox``
        (``[x, y, w, h]``, ints, the tight box of the visible pixels, inside
        the image) and ``visible`` (the visible fraction of its area).
        ``owner``: shape (H, W) int16, the index into ``objects`` of the
        shape seen at each pixel, -1 for background.
    """
    size = params.img_size
    img = _background(rng, size)
    owner = np.full((size, size), -1, np.int16)  # index of the shape seen at each pixel
    placed = []  # (label, y0, x0, side, full_area)
    visible = []  # visible pixel count of each placed shape
    colours = []
    num = int(rng.integers(params.min_objects, params.max_objects + 1))
    log_min, log_max = math.log(params.min_size), math.log(params.max_size)
    for _ in range(num):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        obj_size = math.exp(rng.uniform(log_min, log_max))
        alpha, mask = shape_alpha(SHAPE_CLASSES[label], obj_size, rng)
        side = alpha.shape[0]
        area = int(mask.sum())
        for _attempt in range(10):
            y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            below = owner[y0 : y0 + side, x0 : x0 + side][mask]
            hidden = np.bincount(below[below >= 0], minlength=len(placed))
            ok = all(
                visible[j] - hidden[j] >= (1 - params.max_occlusion) * placed[j][4]
                for j in np.flatnonzero(hidden)
            )
            if ok:
                break
        else:
            continue  # no room for this shape: skip it
        region = img[y0 : y0 + side, x0 : x0 + side]
        avoid = [region[mask].mean(0)] + [colours[j] for j in np.flatnonzero(hidden)]
        colour = _pick_colour(rng, avoid).astype(np.float32)
        region += alpha[..., None] * (colour - region)  # alpha compositing, in place
        for j in np.flatnonzero(hidden):
            visible[j] -= int(hidden[j])
        owner[y0 : y0 + side, x0 : x0 + side][mask] = len(placed)
        placed.append((label, y0, x0, side, area))
        visible.append(area)
        colours.append(colour)
    # uniform pixel noise (from raw bytes: much cheaper than Gaussian samples)
    noise = np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape)
    std = params.noise_std * rng.uniform(0.3, 1.0)
    img += (noise.astype(np.float32) - np.float32(127.5)) * np.float32(std / 73.9)  # unit std
    img += 0.5  # round to nearest in the cast below
    img = np.clip(img, 0, 255, out=img).astype(np.uint8)

    objects = []
    for k, (label, y0, x0, side, area) in enumerate(placed):
        ys, xs = np.nonzero(owner[y0 : y0 + side, x0 : x0 + side] == k)
        x1, y1 = x0 + int(xs.min()), y0 + int(ys.min())
        w, h = x0 + int(xs.max()) + 1 - x1, y0 + int(ys.max()) + 1 - y1
        objects.append(dict(label=label, bbox=[x1, y1, w, h], visible=visible[k] / area))
    return (img, objects, owner) if return_owner else (img, objects)
