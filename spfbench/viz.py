"""Maps you can look at (``spfbench viz``): PNG grids of cross-attention maps and of the SFCM.

* :func:`attention_grid`: the target text's cross-attention map of a complete caption at several
  denoising steps, one row per model (original, naive, SPF ...; paper Fig. 2). Per UNet call: the
  conditional half of the batch, every cross-attention layer's probabilities averaged over heads,
  resized to ``size`` x ``size`` and averaged over layers (``AttentionStore.mean_map``), then averaged
  over the target text's tokens.
* :func:`sfcm_grid`: for one training sample at one timestep, M (normalised noise difference), each
  base phrase's map weighted by (1 - gamma), their sum and M-hat (paper Fig. 3-4), computed by
  :meth:`trainers.spf.Spf.sfcm_parts`, i.e. exactly as the stage-2 loss computes them.

Maps come from the one capture mechanism (:mod:`trainers.attention`). Rendering is PIL only: a
colormap written here, nearest-neighbour upscaling (each map cell is a block of identical pixels), PIL's
default font. Images are written atomically. Display normalisation is described in ``docs/spf.md``
("Maps").
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .errors import SpfbenchError

# Colormap anchors (value, RGB): black -> purple -> red -> orange -> pale yellow, an inferno-like ramp
# that stays readable in grey scale (monotone luminance).
_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)

PAD = 6  # pixels between cells and around the grid
LABEL_W = 96  # width of the row-label column
LINE_H = 12  # height of one text line (PIL's default bitmap font is ~11 px)


def colormap(values) -> np.ndarray:
    """uint8 RGB (..., 3) of ``values`` in [0, 1] (clipped; NaN -> 0)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0).clip(0.0, 1.0)
    out = np.stack([np.interp(v, _ANCHORS, _COLORS[:, c]) for c in range(3)], axis=-1)
    return np.rint(out).astype(np.uint8)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _wrap(text: str, width_px: int) -> list[str]:
    chars = max(4, width_px // 6)  # the default bitmap font is ~6 px per character
    return textwrap.wrap(text, chars) or [""]


@dataclass
class Grid:
    """A rendered grid: the PIL image and each panel's box (x0, y0, x1, y1) by (row, column)."""

    image: object
    boxes: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def render_grid(
    panels: list[list[np.ndarray | object]],
    *,
    row_labels: list[str],
    col_labels: list[str] | list[list[str]],
    title: str = "",
    cell: int = 128,
) -> Grid:
    """Lay out ``panels[r][c]`` (a 2-D map in [0, 1], drawn with :func:`colormap`, or a PIL image) as a
    labelled grid: a title, one label per column on top (a list per column: several lines), one label
    per row on the left. Cells are ``cell`` x ``cell`` pixels; maps are upscaled nearest-neighbour."""
    from PIL import Image, ImageDraw

    rows = len(panels)
    cols = max(len(r) for r in panels) if panels else 0
    if rows == 0 or cols == 0:
        raise ValueError("nothing to draw")
    col_lines = [[c] if isinstance(c, str) else list(c) for c in col_labels]
    col_lines = [[ln for part in c for ln in _wrap(part, cell)] for c in col_lines]
    header_h = LINE_H * max((len(c) for c in col_lines), default=1)
    width = LABEL_W + cols * (cell + PAD) + PAD
    title_lines = _wrap(title, width - 2 * PAD) if title else []
    title_h = LINE_H * len(title_lines) + (PAD if title_lines else 0)
    height = PAD + title_h + header_h + PAD + rows * (cell + PAD)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font()
    y = PAD
    for line in title_lines:
        draw.text((PAD, y), line, fill=(0, 0, 0), font=font)
        y += LINE_H
    y = PAD + title_h
    for c, lines in enumerate(col_lines):
        x = LABEL_W + PAD + c * (cell + PAD)
        for i, line in enumerate(lines):
            draw.text((x, y + i * LINE_H), line, fill=(0, 0, 0), font=font)
    top = PAD + title_h + header_h + PAD
    boxes = {}
    for r, row in enumerate(panels):
        y0 = top + r * (cell + PAD)
        for i, line in enumerate(_wrap(row_labels[r], LABEL_W - PAD)[: max(1, cell // LINE_H)]):
            draw.text((PAD, y0 + i * LINE_H), line, fill=(0, 0, 0), font=font)
        for c, panel in enumerate(row):
            x0 = LABEL_W + PAD + c * (cell + PAD)
            if isinstance(panel, np.ndarray) or torch.is_tensor(panel):
                arr = np.asarray(panel.detach().cpu().float() if torch.is_tensor(panel) else panel)
                if arr.ndim != 2:
                    raise ValueError(f"a map panel must be 2-D, got shape {arr.shape}")
                tile = Image.fromarray(colormap(arr)).resize((cell, cell), Image.NEAREST)
            else:
                tile = panel.convert("RGB").resize((cell, cell), Image.BICUBIC)
            img.paste(tile, (x0, y0))
            boxes[(r, c)] = (x0, y0, x0 + cell, y0 + cell)
    return Grid(img, boxes)


def save_png(image, out: str | Path) -> Path:
    from .io import atomic_write_bytes, encode_png

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise SpfbenchError(f"{out}: the output must end in .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, encode_png(image))
    return out


def display_normalize(maps: torch.Tensor, mode: str) -> torch.Tensor:
    """Scale non-negative maps (..., S, S) for display: ``panel`` divides each map by its own maximum,
    ``row`` / ``global`` by the maximum over the leading dim / over all maps (dim 0 = rows, dim 1 =
    columns for a (R, C, S, S) stack), ``none`` keeps the values (already in [0, 1])."""
    maps = maps.float()
    if mode == "none":
        return maps.clamp(0, 1)
    if mode == "panel":
        peak = maps.amax(dim=(-2, -1), keepdim=True)
    elif mode == "row":
        peak = maps.flatten(1).amax(1).reshape(-1, *([1] * (maps.dim() - 1)))
    elif mode == "global":
        peak = maps.amax()
    else:
        raise SpfbenchError(f"unknown display normalisation {mode!r} (panel, row, global, none)")
    return maps / torch.clamp(peak, min=1e-12)


# ---------------------------------------------------------------------------------------- tokens


def target_token_positions(tokenizer, caption: str, target: str, max_length: int = 77) -> list[int]:
    """Positions of ``target``'s tokens in the tokenization of ``caption`` (start token = position 0).

    The target must occur in the caption (case-insensitive, as CLIP lower-cases) on word boundaries
    that tokenize the same inside the caption; its last occurrence is used (the target text comes last
    in a complete caption). Positions beyond the 77-token window are dropped; none left is an error."""
    if not target.strip():
        raise SpfbenchError("the target text is empty")
    s = caption.lower().rfind(target.strip().lower())
    if s < 0:
        raise SpfbenchError(f"target text {target!r} does not occur in the caption {caption!r}")
    e = s + len(target.strip())

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)

    full = ids(caption)
    a, b = len(ids(caption[:s])), len(ids(caption[:e]))
    if full[a:b] != ids(caption[s:e]) or full[:a] != ids(caption[:s]):
        raise SpfbenchError(f"target text {target!r} does not tokenize the same inside {caption!r} (give whole words)")
    pos = [1 + i for i in range(a, b) if 1 + i <= max_length - 2]
    if not pos:
        raise SpfbenchError(f"target text {target!r} lies beyond CLIP's {max_length}-token window")
    return pos


# ---------------------------------------------------------------------------------- (a) attention


@dataclass
class ModelSpec:
    """A row of the attention grid: ``name`` and an artifact folder (None: the base model itself)."""

    name: str
    artifact: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        name, sep, path = text.partition("=")
        name = name.strip()
        if not name:
            raise SpfbenchError(f"--model takes NAME or NAME=ARTIFACT, got {text!r}")
        if not sep:
            if name != "original":
                raise SpfbenchError(f"--model {text!r}: give NAME=ARTIFACT (only 'original' needs no artifact)")
            return cls(name)
        if not path.strip():
            raise SpfbenchError(f"--model {text!r}: empty artifact path")
        return cls(name, Path(path.strip()))

    def check(self) -> None:
        if self.artifact is None:
            return
        from trainers.base import ARTIFACT_META

        if not self.artifact.is_dir():
            raise SpfbenchError(f"model {self.name!r}: artifact folder {self.artifact} does not exist")
        if not (self.artifact / ARTIFACT_META).is_file():
            raise SpfbenchError(f"model {self.name!r}: {self.artifact} is not a method artifact ({ARTIFACT_META} missing; give RUN/artifact)")


@dataclass
class AttentionTrace:
    """One model's target-token maps, one per UNet call of the generation."""

    maps: torch.Tensor  # (calls, S, S), raw layer-, head- and token-averaged probabilities
    timesteps: list[int]
    image: object = None  # the generated PIL image


def target_attention_trace(pipe, caption: str, target: str, seed: int, settings, *, size: int = 64,
                           fitted=None) -> AttentionTrace:
    """Generate ``caption`` (the foundation's :func:`~spfbench.generation.generate`, through a fitted method's
    ``generate`` when given: :func:`trainers.load_artifact` on ``pipe``) with a capture store installed, and keep per UNet call the map of
    the target text's tokens: conditional half of the batch (with classifier-free guidance the batch is
    [uncond, cond]), heads, layers (each resized to ``size``, bilinear) and target tokens averaged."""
    from trainers.attention import AttentionStore, capture_cross_attention

    positions = target_token_positions(pipe.tokenizer, caption, target)
    store = AttentionStore(probs=True, keep_grad=False)
    maps, timesteps = [], []

    def after_forward(module, args, kwargs, output):
        m = store.mean_map(size, layout="grid")  # (B, T, S, S)
        m = m[m.shape[0] // 2:] if m.shape[0] == 2 else m  # [uncond, cond] -> cond (one prompt)
        maps.append(m[0, positions].float().mean(0).cpu())
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        timesteps.append(int(t.flatten()[0]) if torch.is_tensor(t) else int(t))

    triple = SimpleNamespace(target_caption=caption, seed=int(seed), base_caption=caption, target_text=target,
                             id="viz", index=0)
    with capture_cross_attention(pipe.unet, store):
        hook = pipe.unet.register_forward_hook(after_forward, with_kwargs=True)
        try:
            if fitted is not None:
                images, _ = fitted.generate([triple], settings)
            else:
                from .generation import generate

                images = generate(pipe, [caption], [int(seed)], settings)
        finally:
            hook.remove()
    if not maps:
        raise SpfbenchError("the generation ran no UNet forward")
    return AttentionTrace(torch.stack(maps), timesteps, images[0] if images else None)


def choose_columns(n_calls: int, columns: int | None = None, at: list[int] | None = None) -> list[int]:
    """Which UNet calls become columns: ``at`` (indices, negative from the end) or ``columns`` evenly
    spaced from the first to the last call (default: min(5, n_calls))."""
    if at:
        out = []
        for i in at:
            j = i + n_calls if i < 0 else i
            if not 0 <= j < n_calls:
                raise SpfbenchError(f"--at {i}: the generation has {n_calls} denoising steps (0..{n_calls - 1})")
            out.append(j)
        return out
    k = min(columns or 5, n_calls)
    if k < 1:
        raise SpfbenchError(f"--columns must be at least 1, got {columns}")
    if k == 1:
        return [n_calls - 1]
    return sorted({round(i * (n_calls - 1) / (k - 1)) for i in range(k)})


def attention_grid(traces: dict[str, AttentionTrace], caption: str, target: str, *, columns: int | None = None,
                   at: list[int] | None = None, normalize: str = "panel", cell: int = 128,
                   with_image: bool = False) -> Grid:
    """Rows = models (in ``traces`` order), columns = the chosen denoising steps (+ the final image)."""
    n = min(len(t.maps) for t in traces.values())
    cols = choose_columns(n, columns, at)
    names = list(traces)
    stack = torch.stack([traces[m].maps[cols] for m in names])  # (R, C, S, S)
    shown = display_normalize(stack, normalize)
    first = traces[names[0]]
    col_labels = [[f"step {c + 1}/{n}", f"t={first.timesteps[c]}"] for c in cols]
    panels = [[shown[r, c].numpy() for c in range(len(cols))] for r in range(len(names))]
    if with_image:
        col_labels.append(["image"])
        for r, m in enumerate(names):
            panels[r].append(traces[m].image)
    labels = [f"{m}  max {stack[r].max().item():.3g}" for r, m in enumerate(names)]
    title = f"cross-attention of '{target}' in '{caption}' (heads, layers, target tokens averaged; display: {normalize})"
    return render_grid(panels, row_labels=labels, col_labels=col_labels, title=title, cell=cell)


def _pipeline(preset: str, model: str | None, weights_seed: int, device, dtype):
    from .models import load_pipeline

    pipe, _ = load_pipeline(preset, model=model, seed=weights_seed, device=device, dtype=dtype)
    return pipe


def run_attention(models: list[ModelSpec], caption: str, target: str, out: Path, *, preset: str = "tiny",
                  base_model: str | None = None, weights_seed: int = 0, seed: int = 0, settings=None,
                  columns: int | None = None, at: list[int] | None = None, size: int = 64,
                  normalize: str = "panel", cell: int = 128, with_image: bool = False, device=None,
                  dtype=None) -> Grid:
    """``spfbench viz attention``: one fresh base pipeline per model, its artifact loaded, traced."""
    from .generation import GenerationSettings

    if not models:
        models = [ModelSpec("original")]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise SpfbenchError(f"model names must be distinct, got {names}")
    for m in models:
        m.check()
    settings = (settings or GenerationSettings()).validate()
    traces = {}
    for m in models:
        pipe = _pipeline(preset, base_model, weights_seed, device, dtype)
        target_token_positions(pipe.tokenizer, caption, target)  # fail before any generation
        fitted = None
        if m.artifact is not None:
            from trainers import load_artifact

            fitted = load_artifact(m.artifact, pipe)
        traces[m.name] = target_attention_trace(pipe, caption, target, seed, settings, size=size, fitted=fitted)
        del pipe
    grid = attention_grid(traces, caption, target, columns=columns, at=at, normalize=normalize, cell=cell,
                          with_image=with_image)
    save_png(grid.image, out)
    return grid


# --------------------------------------------------------------------------------------- (b) SFCM


@dataclass
class SfcmView:
    m: torch.Tensor  # (S, S)
    phrase_maps: torch.Tensor  # (P, S, S) A_base[i] (scaled as ``normalize`` says)
    gamma: torch.Tensor  # (P,)
    phrases: list[str]
    exclusion: torch.Tensor  # (S, S)
    m_hat: torch.Tensor  # (S, S)
    image: object = None  # the training image (PIL)
    timestep: int = 0
    normalize: str = "none"  # SpfConfig.sfcm_normalize the maps were computed with

    @property
    def weighted(self) -> torch.Tensor:
        """(P, S, S): A_base[i] (1 - clamp(gamma_i, 0, 1)), what eq. 7 subtracts per phrase."""
        return self.phrase_maps * (1 - self.gamma.clamp(0, 1))[:, None, None]


def sfcm_view(reference_unet, models, method, item: dict, timestep: int, seed: int = 0,
              gamma: float | None = None) -> SfcmView:
    """The SFCM of one training item (a :class:`~spfbench.data.PortraitDataset` item) at ``timestep``:
    the same x_t for both paths (VAE posterior sample and noise from ``seed``), the response path
    (``models.unet``) fed the complete caption, the reference path (``reference_unet``, the original
    model) the base caption with its cross-attention probabilities captured; then
    :meth:`trainers.spf.Spf.sfcm_parts`. ``gamma`` forces every gamma(i) to that value."""
    from spfbench.data import collate
    from trainers.attention import AttentionStore, capture_cross_attention
    from trainers.base import encode_batch, encode_text

    batch = collate([item])
    sched = models.noise_scheduler
    n_train = sched.config.num_train_timesteps
    if not 0 <= int(timestep) < n_train:
        raise SpfbenchError(f"--timestep must be in 0..{n_train - 1}, got {timestep}")
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        latents, text = encode_batch(models, batch, g)
        bases, targets = list(batch["base_caption"]), list(batch["target_text"])
        text_base = encode_text(models, bases)
        noise = torch.randn(latents.shape, generator=g).to(latents)
        t = torch.full((1,), int(timestep), dtype=torch.long, device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        out_res = models.unet(noisy.to(models.weight_dtype), t, text).sample.float()
        store = AttentionStore(probs=True, keep_grad=False)
        with capture_cross_attention(reference_unet, store):
            ref_dtype = next(reference_unet.parameters()).dtype
            out_ref = reference_unet(noisy.to(ref_dtype), t, text_base.to(ref_dtype)).sample.float()
        probs = [store[n].probs for n in store.names()]
    gam = None if gamma is None else torch.full((1, 1), float(gamma))
    parts = method.sfcm_parts(models, bases, targets, out_ref, out_res, probs, tuple(latents.shape[-2:]), gamma=gam)
    p = int(parts.phrase_mask[0].sum())
    from PIL import Image

    pix = ((batch["pixel_values"][0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return SfcmView(parts.m[0].cpu(), parts.phrase_maps[0, :p].cpu(), parts.gamma[0, :p].float().cpu(),
                    list(parts.phrases[0][:p]), parts.exclusion[0].cpu(), parts.m_hat[0].cpu(),
                    Image.fromarray(pix), int(timestep), method.config.sfcm_normalize)


def sfcm_grid(view: SfcmView, caption: str, cell: int = 128) -> Grid:
    """One row: the training image, M, each phrase map times (1 - gamma), their sum, M-hat. Every map is
    shown on the absolute [0, 1] scale (no display renormalisation), so panels compare directly."""
    panels = [view.image, view.m.numpy()]
    labels = [["image"], ["M = |eps_ref - eps_res|", {"none": "raw"}.get(view.normalize, view.normalize)]]
    for i, ph in enumerate(view.phrases):
        panels.append(view.weighted[i].numpy())
        labels.append([f"A[{i}]*(1-g), g={view.gamma[i].item():.2f}", ph])
    panels += [view.exclusion.clamp(0, 1).numpy(), view.m_hat.numpy()]
    labels += [["sum_i A[i](1-g_i)"], ["M-hat = clamp(M - sum)"]]
    title = f"SFCM at t={view.timestep}: {caption}"
    return render_grid([panels], row_labels=[f"t={view.timestep}"], col_labels=labels, title=title, cell=cell)


def run_sfcm(data: Path, index: int, out: Path, *, artifact: Path | None = None, preset: str = "tiny",
             base_model: str | None = None, weights_seed: int = 0, timestep: int = 500, seed: int = 0,
             gamma: float | None = None, cell: int = 128, device=None) -> tuple[Grid, SfcmView]:
    """``spfbench viz sfcm``: the reference path is the base model, the response path the artifact's
    model (an SPF artifact, whose config gives the SFCM options; another method's artifact, or none,
    uses SPF's defaults). fp32 throughout."""
    import trainers
    from spfbench.data import PortraitDataset
    from trainers.base import Models, read_artifact_meta
    from trainers.loop import training_scheduler
    from trainers.spf import Spf

    method = Spf()
    if artifact is not None:
        ModelSpec("response", Path(artifact)).check()
        meta = read_artifact_meta(Path(artifact))
        cls = trainers.method_class(meta["method"])
        if issubclass(cls, Spf):
            method = cls(cls.Config.from_dict(meta["config"], source=str(artifact)))
    if not Path(data).exists():
        raise SpfbenchError(f"data {data} does not exist")
    ref_pipe = _pipeline(preset, base_model, weights_seed, device, torch.float32)
    res_pipe = _pipeline(preset, base_model, weights_seed, device, torch.float32)
    if artifact is not None:
        trainers.load_artifact(Path(artifact), res_pipe)
    native = res_pipe.unet.config.sample_size * res_pipe.vae_scale_factor
    ds = PortraitDataset(data, resolution=native, validate_images=False)
    if not 0 <= index < len(ds):
        raise SpfbenchError(f"--index {index} out of range: the set has {len(ds)} items")
    models = Models(res_pipe.unet, res_pipe.vae, res_pipe.text_encoder, res_pipe.tokenizer, training_scheduler(res_pipe),
                    preset=preset)  # (SPF's CLIP follows the base model's environment, as in training)
    ref_pipe.unet.eval()
    res_pipe.unet.eval()
    item = ds[index]
    view = sfcm_view(ref_pipe.unet, models, method, item, timestep, seed=seed, gamma=gamma)
    grid = sfcm_grid(view, item["caption"], cell=cell)
    save_png(grid.image, out)
    return grid, view
