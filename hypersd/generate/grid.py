"""A labelled image grid: one row per prompt, one column per setting."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def make_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
              cell: int = 128, label_width: int = 160, font_size: int = 13,
              corner: str = "") -> Image.Image:
    """Cells upscaled (nearest) to ``cell`` pixels, prompts on the left, settings on top and
    ``corner`` (e.g. the method) above the prompts."""
    font = _font(font_size)
    header = 2 * font_size + 8
    grid = Image.new("RGB", (label_width + cell * len(col_labels), header + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(_wrap(draw, corner, font, label_width - 6)[:2] if corner else []):
        draw.text((2, 2 + k * (font_size + 2)), line, fill="black", font=font)
    for j, label in enumerate(col_labels):
        for k, line in enumerate(_wrap(draw, label, font, cell - 4)[:2]):
            draw.text((label_width + j * cell + 2, 2 + k * (font_size + 2)), line, fill="black", font=font)
    for i, (label, images) in enumerate(zip(row_labels, rows)):
        y = header + i * cell
        for k, line in enumerate(_wrap(draw, label, font, label_width - 6)[:cell // (font_size + 2)]):
            draw.text((3, y + 3 + k * (font_size + 2)), line, fill="black", font=font)
        for j, img in enumerate(images):
            resample = Image.Resampling.NEAREST if img.width < cell else Image.Resampling.LANCZOS
            grid.paste(img.convert("RGB").resize((cell, cell), resample), (label_width + j * cell, y))
    return grid
