"""Matplotlib for every PNG the commands write: headless (Agg), and class names in any script.

matplotlib's own font, DejaVu Sans, has no Chinese, Japanese or Korean glyphs, among others: a
class named 猫 came out as a box in every plot, and matplotlib printed "Glyph 29483 missing from
font(s) DejaVu Sans" once per character and plot. Here the plots draw with DejaVu Sans and, for
what it lacks, any installed font of FALLBACK (matplotlib's font fallback); a character no font
draws is said once per command, with what to install, instead of matplotlib's warnings.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

log = logging.getLogger(__name__)
# "findfont: Failed to find font weight normal for WenQuanYi Zen Hei, now using 500", per text
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

FALLBACK = (  # tried in this order for characters DejaVu Sans lacks, when installed
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "Arial Unicode MS",
    "Noto Sans",
    "Noto Sans Arabic",
    "Noto Sans Hebrew",
    "Noto Sans Devanagari",
    "Noto Sans Thai",
)
_said: set[str] = set()  # characters already named in a warning by this process


@functools.cache
def _fonts(fallback: tuple[str, ...]) -> tuple[list[str], frozenset[int]]:
    """(the font families to draw with, every character one of them has)."""
    from matplotlib import font_manager, ft2font

    installed = {f.name for f in font_manager.fontManager.ttflist}
    families = ["DejaVu Sans", *(f for f in fallback if f in installed)]
    codes: set[int] = set()
    for family in families:
        path = font_manager.findfont(font_manager.FontProperties(family=[family]))
        codes |= set(ft2font.FT2Font(path).get_charmap())
    return families, frozenset(codes)


def missing_characters(fig) -> list[str]:
    """The characters in `fig`'s texts that no font it draws with has."""
    codes = _fonts(FALLBACK)[1]
    seen = {ch for t in fig.findobj(Text) for ch in t.get_text() if not ch.isspace()}
    return sorted(ch for ch in seen if ord(ch) not in codes)


@functools.cache
def _look_for_new_fonts() -> None:
    """matplotlib lists the system's fonts once and keeps the list: a font installed since is
    added here (once per process, and only when a label needs a character none has)."""
    from matplotlib import font_manager

    known = {f.fname for f in font_manager.fontManager.ttflist}
    for found in font_manager.findSystemFonts():
        if found not in known:
            try:
                font_manager.fontManager.addfont(found)
            except (OSError, RuntimeError, ValueError):  # a font file FreeType cannot read
                continue
    _fonts.cache_clear()
    plt.rcParams["font.family"] = _fonts(FALLBACK)[0]


def gallery_layout(fig) -> None:
    """tight_layout for a grid of images with captions under a suptitle: 0.4 in for the title, and
    room between rows for two-line captions (plain tight_layout let them cover the row above)."""
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()), h_pad=2.5)


def gallery(images, captions: list[str], path, title: str, cols: int = 6, cell=(2.1, 2.4)):
    """Images (uint8 CHW, grey or colour) in rows of `cols`, each with its caption, under
    `title`; `cell`: inches a picture and its caption take. None when there is none to show."""
    if not captions:
        return None
    rows = (len(captions) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, caption in zip(axes.flat, images, captions, strict=False):
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(fig, path, dpi=110, layout=gallery_layout)


def save(fig, path: str | Path, dpi: int, layout=None) -> Path:
    """`fig` written to `path` (its folder made), laid out by `layout` (fig -> None; default:
    tight_layout), and closed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if missing_characters(fig):
        _look_for_new_fonts()
    for text in fig.findobj(Text):  # made before new fonts were looked for, too
        text.set_fontfamily(_fonts(FALLBACK)[0])
    if new := [ch for ch in missing_characters(fig) if ch not in _said]:
        _said.update(new)
        log.warning(
            "Plots: %d character(s) of their labels are in no installed font (%s; first in %s): "
            "they show as boxes in the PNG files; the CSV and JSON outputs have them right. "
            "Installing a font that has them (Debian and Ubuntu: fonts-noto-cjk for Chinese, "
            "Japanese and Korean) draws them from then on.",
            len(new),
            "".join(new[:20]) + (" ..." if len(new) > 20 else ""),
            path.name,
        )
    with warnings.catch_warnings():  # said above, once, rather than per glyph and plot
        warnings.filterwarnings("ignore", r"Glyph \d+ .*missing from font", UserWarning)
        (layout or (lambda f: f.tight_layout()))(fig)
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


plt.rcParams["font.family"] = _fonts(FALLBACK)[0]
