"""Heatmap and segmentation pictures with Pillow and numpy alone (matplotlib is optional).

    from gem_jax import viz
    viz.overlay(image, maps[0, 0])                      # PIL RGB, the size of `image`
    viz.grid(image, maps[0], titles=prompts)            # the image + one overlay per prompt
    viz.colorize_segmentation(ids[0], num_classes=3, background=(0, 0, 0))
    viz.segmentation_overlay(image, ids[0], ["cat", "dog", "sky"], background="background")

Sizes: a heatmap or id map is always resized to the image it is drawn on (bilinear for
heatmaps, nearest for class ids); the image is never resized to the map, except in `grid`,
where the image is first fitted into a `tile_size` square and the maps follow it.

Colormaps: "viridis" (default) and "turbo" are embedded as 256-entry lookup tables; any other
name is looked up in matplotlib if it is installed; a [256, 3] array (uint8 or floats in [0, 1])
is used as is.
"""

from __future__ import annotations

import colorsys
import unicodedata
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["COLORMAPS", "colormap", "apply_colormap", "resize_map", "overlay", "grid",
           "class_colors", "colorize_segmentation", "legend", "segmentation_overlay",
           "with_legend"]

# 256 x RGB, uint8, hex-encoded: matplotlib's viridis (CC0) and Google's turbo (Apache-2.0).
_VIRIDIS_HEX = (
    "44015444025645045745055946075a46085c460a5d460b5e470d60470e61471063471164471365481467481668481769"
    "48186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a"
    "472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f85"
    "4240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b"
    "3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d"
    "33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e"
    "2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e"
    "26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d"
    "21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f88"
    "1fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad81"
    "28ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc74"
    "3fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc863"
    "5ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d"
    "84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32"
    "addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21a"
    "d8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725"
)
_TURBO_HEX = (
    "30123b32154333184a341b51351e5836215f37246638276d392a733a2d793b2f803c32863d358b3e38913f3b973f3e9c"
    "4040a24143a74146ac4249b1424bb5434eba4451bf4454c34456c74559cb455ccf455ed34661d64664da4666dd4669e0"
    "466be3476ee64771e94773eb4776ee4778f0477bf2467df44680f64682f84685fa4687fb458afc458cfd448ffe4391fe"
    "4294ff4196ff4099ff3e9bfe3d9efe3ba0fd3aa3fc38a5fb37a8fa35abf833adf731aff52fb2f42eb4f22cb7f02ab9ee"
    "28bceb27bee925c0e723c3e422c5e220c7df1fc9dd1ecbda1ccdd81bd0d51ad2d21ad4d019d5cd18d7ca18d9c818dbc5"
    "18ddc218dec018e0bd19e2bb19e3b91ae4b61ce6b41de7b21fe9af20eaac22ebaa25eca727eea42aefa12cf09e2ff19b"
    "32f29835f39438f4913cf58e3ff68a43f78746f8844af8804ef97d52fa7a55fa7659fb735dfc6f61fc6c65fd6969fd66"
    "6dfe6271fe5f75fe5c79fe597dff5680ff5384ff5188ff4e8bff4b8fff4992ff4796fe4499fe429cfe409ffd3fa1fd3d"
    "a4fc3ca7fc3aa9fb39acfb38affa37b1f936b4f836b7f735b9f635bcf534bef434c1f334c3f134c6f034c8ef34cbed34"
    "cdec34d0ea34d2e935d4e735d7e535d9e436dbe236dde037dfdf37e1dd37e3db38e5d938e7d739e9d539ebd339ecd13a"
    "eecf3aefcd3af1cb3af2c93af4c73af5c53af6c33af7c13af8be39f9bc39faba39fbb838fbb637fcb336fcb136fdae35"
    "fdac34fea933fea732fea431fea130fe9e2ffe9b2dfe992cfe962bfe932afe9029fd8d27fd8a26fc8725fc8423fb8122"
    "fb7e21fa7b1ff9781ef9751df8721cf76f1af66c19f56918f46617f36315f26014f15d13f05b12ef5811ed5510ec530f"
    "eb500eea4e0de84b0ce7490ce5470be4450ae2430ae14109df3f08dd3d08dc3b07da3907d83706d63506d43305d23105"
    "d02f05ce2d04cc2b04ca2a04c82803c52603c32503c12302be2102bc2002b91e02b71d02b41b01b21a01af1801ac1701"
    "a91601a71401a41301a112019e10019b0f01980e01950d01920b018e0a018b09028808028507028106027e05027a0403"
)

COLORMAPS = ("viridis", "turbo")
_LUT_HEX = {"viridis": "".join(_VIRIDIS_HEX), "turbo": "".join(_TURBO_HEX)}
_LUT_CACHE: dict[str, np.ndarray] = {}

# Qualitative class colours: tab10 first (most distinct), then the light tab20 shades.
_CLASS_PALETTE = np.array([
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
    [174, 199, 232], [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213],
    [196, 156, 148], [247, 182, 210], [199, 199, 199], [219, 219, 141], [158, 218, 229],
], dtype=np.uint8)


# ----------------------------------------------------------------------------- colormaps
def colormap(cmap="viridis") -> np.ndarray:
    """A colormap as a [256, 3] uint8 lookup table (see the module doc for accepted values)."""
    if isinstance(cmap, str):
        if cmap in _LUT_HEX:
            if cmap not in _LUT_CACHE:
                lut = np.frombuffer(bytes.fromhex(_LUT_HEX[cmap]), np.uint8).reshape(256, 3)
                _LUT_CACHE[cmap] = lut
            return _LUT_CACHE[cmap]
        try:
            import matplotlib
            m = matplotlib.colormaps[cmap]
        except ImportError:
            raise ValueError(f"unknown colormap {cmap!r}: built in are {COLORMAPS} (install "
                             f"matplotlib for its colormaps)") from None
        except KeyError:
            raise ValueError(f"unknown colormap {cmap!r}: built in are {COLORMAPS}, and matplotlib "
                             f"has no colormap of that name") from None
        return np.round(np.asarray(m(np.linspace(0, 1, 256)))[:, :3] * 255).astype(np.uint8)
    lut = np.asarray(cmap)
    if lut.ndim != 2 or lut.shape[1] != 3 or lut.shape[0] < 2:
        raise ValueError(f"a colormap array must have shape [N, 3] (N >= 2), got {lut.shape}")
    if lut.dtype != np.uint8:
        lut = lut.astype(np.float64)
        if not np.isfinite(lut).all() or lut.min() < 0 or lut.max() > 1:
            raise ValueError("a float colormap array must hold values in [0, 1]")
        lut = np.round(lut * 255).astype(np.uint8)
    return lut


def _as_map(heatmap, what="heatmap") -> np.ndarray:
    m = np.asarray(heatmap, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [H, W], got shape {m.shape}")
    if m.size == 0:
        raise ValueError(f"{what} is empty (shape {m.shape})")
    if not np.isfinite(m).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return m


def apply_colormap(values, cmap="viridis") -> np.ndarray:
    """values [H, W] (clipped to [0, 1]) → uint8 RGB [H, W, 3]."""
    lut = colormap(cmap)
    v = np.clip(_as_map(values, "values"), 0.0, 1.0)
    idx = np.round(v * (len(lut) - 1)).astype(np.intp)
    return lut[idx]


def resize_map(heatmap, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map [H, W] to `size` = (width, height), as PIL measures it.
    The weights are non-negative, so values stay within the input's range."""
    m = _as_map(heatmap)
    w, h = int(size[0]), int(size[1])
    if (m.shape[1], m.shape[0]) == (w, h):
        return m
    out = np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR), np.float32)
    return np.clip(out, m.min(), m.max())


# ----------------------------------------------------------------------------- images
def _as_rgb(image) -> Image.Image:
    from .preprocess import to_rgb
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(f"image arrays must be uint8 [H, W] or [H, W, 3], got {image.dtype} "
                            f"{image.shape}; or pass a PIL image")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    return to_rgb(image)


def overlay(image, heatmap, alpha: float = 0.5, cmap="viridis") -> Image.Image:
    """The image with a heatmap blended on top: (1 - alpha) * image + alpha * cmap(heatmap).

    `heatmap` [H, W] is expected in [0, 1] (values outside are clipped) and is resized
    (bilinear) to the image size.  Returns an RGB image of the image's size.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb(image)
    m = resize_map(heatmap, rgb.size)
    color = apply_colormap(m, cmap).astype(np.float32)
    base = np.asarray(rgb, np.float32)
    out = (1.0 - alpha) * base + alpha * color
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- text
def _font(size: int | None = None):
    try:
        return ImageFont.load_default(size=size) if size else ImageFont.load_default()
    except Exception:  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _clean_text(text) -> str:
    """One printable line: control characters (newlines, tabs, ...) become spaces."""
    s = "".join(" " if unicodedata.category(c).startswith("C") else c for c in str(text))
    return " ".join(s.split())


def _drawable(text: str, font) -> str:
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")  # the bitmap font is latin-1 only


def _text_width(draw, text, font) -> int:
    if not text:
        return 0
    l, _, r, _ = draw.textbbox((0, 0), text, font=font)
    return r - l


def _fit_text(draw, text: str, font, width: int) -> str:
    """Text shortened with '...' so that it fits in `width` pixels."""
    text = _drawable(_clean_text(text), font)
    if _text_width(draw, text, font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if _text_width(draw, text[:mid] + "...", font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "..." if lo else ""


def _line_height(font) -> int:
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, t, _, b = d.textbbox((0, 0), "Ag|", font=font)
    return max(b, b - t) + 2


# ----------------------------------------------------------------------------- grid
def _fit(size: tuple[int, int], box: int) -> tuple[int, int]:
    w, h = size
    s = box / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def grid(image, heatmaps, titles: Sequence[str] | None = None, *, alpha: float = 0.5,
         cmap="viridis", ncols: int | None = None, tile_size: int = 224, show_image: bool = True,
         image_title: str = "image", font_size: int = 12) -> Image.Image:
    """A figure of one image and its maps: a tile per heatmap (overlaid), each with its title.

    heatmaps [P, H, W] in [0, 1]; titles: P strings (default "0", "1", ...).  The image is fitted
    into a `tile_size` square (aspect kept) and the maps are resized to the fitted image.  The
    original image comes first unless `show_image` is False.  Cells are laid out `ncols` per row
    (default up to 4).  Returns an RGB image.
    """
    maps = np.asarray(heatmaps, dtype=np.float32)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"heatmaps must be an array [P, H, W] with P >= 1, got shape {maps.shape}")
    titles = [str(i) for i in range(len(maps))] if titles is None else [str(t) for t in titles]
    if len(titles) != len(maps):
        raise ValueError(f"got {len(titles)} titles for {len(maps)} heatmaps")
    if int(tile_size) < 8:
        raise ValueError(f"tile_size must be >= 8, got {tile_size}")
    tile_size = int(tile_size)
    rgb = _as_rgb(image)
    small = rgb.resize(_fit(rgb.size, tile_size), Image.BICUBIC)
    cells = ([(image_title, small)] if show_image else []) + \
        [(t, overlay(small, m, alpha, cmap)) for t, m in zip(titles, maps)]
    n = len(cells)
    ncols = min(n, 4) if ncols is None else max(1, min(int(ncols), n))
    nrows = -(-n // ncols)
    font = _font(font_size)
    th = _line_height(font) + 4
    pad = 6
    cw = max(small.width, min(tile_size, 96))  # room for a title above very narrow images
    ch = small.height + th
    canvas = Image.new("RGB", (pad + ncols * (cw + pad), pad + nrows * (ch + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (title, tile) in enumerate(cells):
        x0 = pad + (i % ncols) * (cw + pad)
        y0 = pad + (i // ncols) * (ch + pad)
        text = _fit_text(draw, title, font, cw)
        draw.text((x0 + (cw - _text_width(draw, text, font)) // 2, y0 + 1), text, fill=(0, 0, 0),
                  font=font)
        canvas.paste(tile, (x0 + (cw - tile.width) // 2, y0 + th))
    return canvas


# ----------------------------------------------------------------------------- segmentation
def class_colors(num_classes: int, background=None) -> np.ndarray:
    """uint8 [num_classes (+1), 3]: the colour of each id.  With a `background` RGB colour, id 0
    is the background and ids 1..num_classes are the classes."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    cols = [_CLASS_PALETTE[i] if i < len(_CLASS_PALETTE) else _golden_color(i)
            for i in range(int(num_classes))]
    if background is not None:
        cols = [_as_color(background)] + cols
    return np.array(cols, dtype=np.uint8)


def _golden_color(i: int) -> np.ndarray:
    h = (i * 0.618033988749895) % 1.0
    s, v = (0.65, 0.95) if i % 2 else (0.9, 0.75)
    return np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255).astype(np.uint8)


def _as_color(c) -> np.ndarray:
    a = np.asarray(c)
    if a.shape != (3,) or not np.issubdtype(a.dtype, np.number) or a.min() < 0 or a.max() > 255:
        raise ValueError(f"a colour must be an (R, G, B) triple of 0..255 values, got {c!r}")
    return a.astype(np.uint8)


def _check_ids(ids, num_ids: int) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"ids must be a non-empty 2-D array [H, W], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {a.dtype}")
    if a.min() < 0 or a.max() >= num_ids:
        raise ValueError(f"ids must be in [0, {num_ids - 1}], got values in [{a.min()}, {a.max()}]")
    return a


def colorize_segmentation(ids, num_classes: int, background=None) -> Image.Image:
    """Class ids [H, W] → a colour-coded image.

    Without `background`, ids are 0..num_classes-1 (`GEMModel.segment` without a threshold); with
    a `background` RGB colour, 0 is the background and classes are 1..num_classes (`segment` with
    `background_threshold`).  Up to 256 ids the result is a palette ("P") image whose pixel values
    *are* the class ids (saved as PNG it keeps them exactly); beyond that it is RGB.
    """
    colors = class_colors(num_classes, background)
    a = _check_ids(ids, len(colors))
    if len(colors) <= 256:
        img = Image.frombytes("P", (a.shape[1], a.shape[0]), np.ascontiguousarray(a, np.uint8).tobytes())
        pal = np.zeros((256, 3), np.uint8)
        pal[:len(colors)] = colors
        img.putpalette(pal.tobytes())
        return img
    return Image.fromarray(colors[a])


def legend(labels: Sequence[str], colors, *, font_size: int = 12, swatch: int | None = None,
           max_width: int = 320) -> Image.Image:
    """A white RGB panel listing colour swatches and their labels, one per row."""
    labels = [str(s) for s in labels]
    cols = np.asarray(colors)
    if cols.ndim != 2 or cols.shape[1] != 3 or len(cols) != len(labels):
        raise ValueError(f"legend needs one RGB colour per label: {len(labels)} labels, colours of "
                         f"shape {cols.shape}")
    if not labels:
        raise ValueError("legend needs at least one label")
    font = _font(font_size)
    lh = _line_height(font)
    sw = swatch or lh
    row = max(sw, lh) + 4
    pad = 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [_fit_text(probe, s, font, max_width - sw - 3 * pad) for s in labels]
    width = min(max_width, 3 * pad + sw + max(_text_width(probe, t, font) for t in texts))
    img = Image.new("RGB", (max(width, sw + 2 * pad), 2 * pad + row * len(labels)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (t, c) in enumerate(zip(texts, cols)):
        y = pad + i * row
        draw.rectangle([pad, y, pad + sw - 1, y + sw - 1], fill=tuple(int(v) for v in c),
                       outline=(0, 0, 0))
        draw.text((2 * pad + sw, y + (sw - lh) // 2), t, fill=(0, 0, 0), font=font)
    return img


def with_legend(image: Image.Image, panel: Image.Image) -> Image.Image:
    """The image with a legend panel on its right (white padding where their heights differ)."""
    image = _as_rgb(image)
    out = Image.new("RGB", (image.width + panel.width, max(image.height, panel.height)),
                    (255, 255, 255))
    out.paste(image, (0, 0))
    out.paste(panel, (image.width, 0))
    return out


def segmentation_overlay(image, ids, class_names: Sequence[str], *, background: str | None = None,
                         alpha: float = 0.5, show_legend: bool = True) -> Image.Image:
    """Class colours blended over the image (ids resized, nearest, to the image size).

    `background`: None if ids are 0..C-1; else the label of id 0 (e.g. "background"), which is
    left untinted.  With `show_legend`, a legend panel is added on the right.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    names = [str(c) for c in class_names]
    colors = class_colors(len(names), None if background is None else (0, 0, 0))
    a = _check_ids(ids, len(colors))
    rgb = _as_rgb(image)
    if (a.shape[1], a.shape[0]) != rgb.size:
        a = np.asarray(Image.fromarray(a.astype(np.int32)).resize(rgb.size, Image.NEAREST))
    base = np.asarray(rgb, np.float32)
    tint = colors[a].astype(np.float32)
    wgt = np.full(a.shape + (1,), float(alpha), np.float32)
    if background is not None:
        wgt[a == 0] = 0.0
    out = Image.fromarray(np.round((1 - wgt) * base + wgt * tint).astype(np.uint8))
    if not show_legend:
        return out
    labels = ([str(background)] if background is not None else []) + names
    return with_legend(out, legend(labels, colors))
