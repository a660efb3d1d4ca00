"""The one painter of the suite's drawn portraits: the toy data (:mod:`spfbench.toydata`) and Portrait World
(:mod:`spfbench.world.render`) both draw with it, each with its own figure and looks.

A :class:`Painter` draws at ``k`` times the output size (``k`` = 4, fewer above 256 px, never over 1024 px
drawn) with PIL.ImageDraw and reduces with LANCZOS (:meth:`Painter.finish`): same calls and Pillow version,
same bytes. Optionally every shape is drawn inside a named part and recorded on a label map (the world's
ground-truth part masks, :class:`PartCanvas`). It holds the colour tables, the scenes (plain colour, brick
wall, beach, forest) and the pieces both figures share (neck and neckline, ears, glasses, hat) with their
geometry as arguments, and the two pencil-drawing filters.
"""

from __future__ import annotations

PLAIN_BACKGROUNDS = {
    "red": (196, 64, 58),
    "blue": (70, 110, 196),
    "white": (240, 240, 236),
    "grey": (140, 142, 146),
    "green": (84, 156, 92),
    "yellow": (232, 204, 84),
}
CLOTHING_RGB = {
    "white": (236, 236, 232),
    "black": (34, 34, 38),
    "red": (186, 40, 44),
    "blue": (44, 78, 170),
    "green": (40, 128, 64),
    "yellow": (226, 190, 40),
    "grey": (120, 122, 126),
    "pink": (232, 144, 176),
    "brown": (116, 74, 44),
    "purple": (112, 60, 150),
}
SKIN_TONES = {
    "pale": (246, 222, 204),
    "light": (234, 196, 166),
    "tan": (204, 156, 116),
    "brown": (150, 102, 70),
    "dark": (98, 64, 44),
}
HAIR_COLORS = {
    "black": (30, 26, 24),
    "brown": (96, 60, 34),
    "blonde": (222, 188, 112),
    "red": (168, 62, 30),
    "grey": (168, 168, 168),
    "white": (228, 228, 224),
}
EYE_COLORS = {"brown": (92, 56, 30), "blue": (60, 110, 180), "green": (64, 128, 80), "grey": (110, 120, 128)}
HAT_COLORS = {"black": (30, 30, 34), "red": (178, 36, 40), "blue": (40, 70, 160), "brown": (120, 78, 44), "beige": (214, 190, 150)}
WALL = ((200, 196, 188), (160, 70, 52))  # mortar, brick
SKY, SEA, SAND, SUN = (150, 200, 238), (40, 110, 170), (230, 210, 160), (252, 236, 120)
FOREST, TRUNK = (56, 98, 60), (92, 64, 40)


def shade(rgb, f: float):
    """``rgb`` scaled by ``f``, rounded and clipped to 0-255."""
    return tuple(max(0, min(255, int(round(c * f)))) for c in rgb)


class PartCanvas:
    """``ImageDraw.Draw(img)`` that draws every shape inside the current part (``canvas.part = name``, one of
    ``parts``).

    With ``labels`` (an "L" image of the same size), each call is repeated there with the same arguments and
    each colour (``fill=`` / ``outline=``, always passed by keyword) replaced by the label of (part, colour):
    equal colours stay equal within a call, so PIL draws exactly the same pixels on both. ``label_part``:
    label value -> part (0: the empty canvas, counted as the first part)."""

    def __init__(self, img, parts: tuple[str, ...] = ("image",), labels=None):
        from PIL import ImageDraw

        self.parts = parts
        self.part = parts[0]
        self.label_part: list[str] = [parts[0]]
        self._ids: dict = {}
        self._draw = ImageDraw.Draw(img)
        self._labels = ImageDraw.Draw(labels) if labels is not None else None

    def _label(self, colour) -> int:
        key = (self.part, colour)
        if key not in self._ids:
            if len(self.label_part) > 255:
                raise RuntimeError("more than 255 (part, colour) labels in one portrait")
            self._ids[key] = len(self.label_part)
            self.label_part.append(self.part)
        return self._ids[key]

    def __getattr__(self, op):
        draw = getattr(self._draw, op)
        if self._labels is None:
            return draw
        if self.part not in self.parts:
            raise ValueError(f"unknown part {self.part!r}")
        label = getattr(self._labels, op)

        def both(*args, **kw):
            draw(*args, **kw)
            label(*args, **{k: self._label(v) if k in ("fill", "outline") and v is not None else v for k, v in kw.items()})

        return both


class Painter:
    """A supersampled ``size`` x ``size`` RGB canvas. ``parts``: record every shape's part on a label map
    (:attr:`labels`); coordinates are fractions of the side (:meth:`P`, :meth:`box`)."""

    def __init__(self, size: int, parts: tuple[str, ...] | None = None):
        from PIL import Image

        self.size = size
        self.k = max(1, min(4, 1024 // size))  # drawn at k x the size (at most 1024 px), then reduced (antialiasing)
        self.S = size * self.k
        self.img = Image.new("RGB", (self.S, self.S))
        self.labels = Image.new("L", (self.S, self.S)) if parts is not None else None
        self.draw = PartCanvas(self.img, parts or ("image",), self.labels)

    def P(self, x: float) -> int:
        """A fraction of the side in drawn pixels."""
        return int(round(x * self.S))

    def box(self, cx: float, cy: float, rx: float, ry: float) -> list[int]:
        """The bounding box of an ellipse centred at (cx, cy) with radii rx, ry."""
        P = self.P
        return [P(cx - rx), P(cy - ry), P(cx + rx), P(cy + ry)]

    def line_width(self, fraction: float) -> int:
        """A line ``fraction`` of the side wide, at least one drawn pixel."""
        return max(1, self.P(fraction))

    # ---- scenes

    def fill(self, rgb) -> None:
        self.draw.rectangle([0, 0, self.S, self.S], fill=rgb)

    def brick_wall(self, rows: int, lw: int) -> None:
        """Rows of bricks, every other row offset by half a brick (four bricks to the width), ``lw`` mortar."""
        P, d = self.P, self.draw
        self.fill(WALL[0])
        for r in range(rows):
            y0, y1 = P(r / rows), P((r + 1) / rows)
            off = 0.0 if r % 2 == 0 else 0.125
            for c in range(-1, 5):
                x0 = P(c * 0.25 + off)
                d.rectangle([x0 + lw, y0 + lw, x0 + P(0.25) - lw, y1 - lw], fill=WALL[1])

    def beach(self, horizon: float, shore: float, sun: tuple[float, float]) -> None:
        """Sky down to ``horizon``, sea down to ``shore``, sand below; the sun at ``sun`` (x, y)."""
        P, S, d = self.P, self.S, self.draw
        d.rectangle([0, 0, S, P(horizon)], fill=SKY)
        d.rectangle([0, P(horizon), S, P(shore)], fill=SEA)
        d.rectangle([0, P(shore), S, S], fill=SAND)
        d.ellipse(self.box(*sun, 0.07, 0.07), fill=SUN)

    def forest(self, xs, canopy_y: float, canopy: tuple) -> None:
        """A tree at each x of ``xs`` (trunk 0.05 wide from 0.25 down, crown at ``canopy_y``), crowns
        alternating between the two colours of ``canopy``."""
        P, S, d = self.P, self.S, self.draw
        self.fill(FOREST)
        for t, x in enumerate(xs):
            d.rectangle([P(x), P(0.25), P(x + 0.05), S], fill=TRUNK)
            d.ellipse(self.box(x + 0.025, canopy_y, 0.13, 0.12), fill=canopy[t % 2])

    # ---- figure pieces both figures share

    def neck(self, cx: float, chin: float, top: float, rgb) -> None:
        """The neck from ``chin`` down to just below the shoulders' ``top``."""
        P = self.P
        self.draw.rectangle([P(cx - 0.05), P(chin - 0.05), P(cx + 0.05), P(top + 0.04)], fill=rgb)

    def neckline(self, cx: float, top: float, rgb) -> None:
        """A round neckline (bare skin) at the shoulders' ``top``."""
        P = self.P
        self.draw.chord([P(cx - 0.07), P(top - 0.04), P(cx + 0.07), P(top + 0.05)], 0, 180, fill=rgb)

    def ear(self, x: float, cy: float, rgb) -> None:
        self.draw.ellipse(self.box(x, cy + 0.01, 0.03, 0.045), fill=rgb)

    def glasses(self, fx: float, cx: float, rx: float, ex: float, ey: float, gr: float, frame, width: int, lens=None) -> None:
        """Two lenses of radius ``gr`` at ``fx`` +- ``ex`` (height ``ey``), rims ``width`` drawn pixels wide
        (``lens``: their fill, None for clear), arms to the head's sides (``cx`` +- ``rx``) and a bridge."""
        P, d = self.P, self.draw
        for s in (-1, 1):
            x = fx + s * ex
            d.ellipse(self.box(x, ey, gr, gr * 0.85), outline=frame, width=width, fill=lens)
            d.line([(P(x + s * gr), P(ey)), (P(cx + s * rx), P(ey - 0.005))], fill=frame, width=width)
        d.line([(P(fx - ex + gr), P(ey)), (P(fx + ex - gr), P(ey))], fill=frame, width=width)

    def hat(self, cx: float, top: float, rx: float, crown: tuple[float, float], band: tuple[float, float], brim_ry: float,
            rgb, band_rgb) -> None:
        """A hat on a head whose top is at ``top`` (``cx`` +- ``rx`` wide): the crown from ``top + crown[0]`` to
        ``top + crown[1]``, a band from ``top + band[0]`` to ``top + band[1]``, a brim of half-height ``brim_ry``
        at the crown's bottom."""
        P, d = self.P, self.draw
        d.rounded_rectangle([P(cx - rx + 0.01), P(top + crown[0]), P(cx + rx - 0.01), P(top + crown[1])], radius=P(0.04), fill=rgb)
        d.rectangle([P(cx - rx + 0.01), P(top + band[0]), P(cx + rx - 0.01), P(top + band[1])], fill=band_rgb)
        d.ellipse(self.box(cx, top + crown[1], rx + 0.1, brim_ry), fill=rgb)

    # ---- styles, output

    def pencil_grey(self) -> None:
        """A grey pencil sketch of the canvas: the edges drawn dark over a light paper tone with faint shading."""
        from PIL import ImageChops, ImageFilter, ImageOps

        gray = ImageOps.grayscale(self.img)
        edges = ImageOps.expand(ImageOps.crop(gray.filter(ImageFilter.FIND_EDGES), 1), 1, fill=0)  # no frame
        n = 2 * max(1, self.k // 2) + 1
        edges = edges.filter(ImageFilter.MaxFilter(n))
        lines = ImageOps.invert(edges.point(lambda v: min(255, v * 4)))  # faint edges drawn dark too
        shading = gray.point(lambda v: 215 + v * 40 // 255)  # light paper tone with faint shading
        self.img = ImageChops.multiply(lines, shading).convert("RGB")

    def pencil_colour(self) -> None:
        """A coloured-pencil sketch of the canvas: dark lines on its edges over a pale, strongly desaturated copy."""
        from PIL import Image, ImageChops, ImageEnhance, ImageFilter, ImageOps

        gray = ImageOps.grayscale(self.img)
        edges = ImageOps.expand(ImageOps.crop(gray.filter(ImageFilter.FIND_EDGES), 1), 1, fill=0)
        edges = edges.filter(ImageFilter.MaxFilter(3 if self.k > 1 else 1))
        lines = ImageOps.invert(edges.point(lambda v: min(255, v * 4))).convert("RGB")
        paper = Image.blend(ImageEnhance.Color(self.img).enhance(0.45), Image.new("RGB", (self.S, self.S), (250, 248, 240)), 0.35)
        self.img = ImageChops.multiply(lines, paper)

    def finish(self):
        """The portrait at its output size (reduced with LANCZOS from the drawing scale)."""
        from PIL import Image

        return self.img.resize((self.size, self.size), Image.LANCZOS) if self.k > 1 else self.img
