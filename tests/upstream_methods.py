"""Torch references for the training-free dense CLIP methods (issue 12), on open_clip 2.23.0.

Each method is transcribed (not copied) from its upstream repository onto an open_clip
``VisionTransformer`` (``open_clip.create_model(name, pretrained=None).visual``), so that a later
JAX implementation can be checked against it on the same weights.  Every public method function
takes ``(visual, pixels, text=None, ...)`` with NCHW float pixels (already normalized) and returns
``MethodOutput(tokens, maps)``:

* ``tokens``  [B, 1+N, E]: the method's projected tokens, ``ln_post(x) @ proj`` of its final stream
  (the class token included, although the segmentors only use the N patch tokens);
* ``maps``    [B, T, gh, gw] or None: the raw patch-text maps of the method's token→map path on
  the patch grid (row-major, gh = H // patch, gw = W // patch), before any upsampling, softmax,
  min-max or threshold.  For every method except CLIP Surgery this is the cosine similarity of the
  L2-normalized patch token with the L2-normalized text embedding; CLIP Surgery's default is its
  "feature surgery" similarity.

Upstream sources (commit = ``git log -1`` of the snapshot read; line numbers refer to it):

=============  ==========================================  =========================================
method         repository @ commit                         files
=============  ==========================================  =========================================
maskclip       mc-lan/ClearCLIP @ ad68a404d55d48d27330b9   open_clip/transformer.py (model_type
               3554eb64a234ff717f                          'MaskCLIP', ignore_residual=True)
maskclip       chongzhou96/MaskCLIP @ 245d31f809be9c1938   mmseg/models/backbones/vit.py,
(official)     f8f30561b6bf9ed033d746                      mmseg/models/decode_heads/maskclip_head.py
surgery        xmed-lab/CLIP_Surgery @ d4696d47f49cfe70f   clip/clip_surgery_model.py, clip/clip.py
               49140afe5eb94f94c5f59bc
sclip          wangf3014/SCLIP @ b56bd3014b9e8a3ee3450bc   clip/model.py, clip_segmentor.py
               fcf53700a67d627b7a
clearclip      mc-lan/ClearCLIP @ ad68a404d55d48d27330b9   open_clip/transformer.py,
               3554eb64a234ff717f                          clearclip_segmentor.py
naclip         sinahmr/NACLIP @ 0cac3a651f753b11315ea799   clip/model.py, naclip.py
               cfbfabf79da1bd76
=============  ==========================================  =========================================

What every upstream shares (and this file therefore shares in `_stem` / `_qkv` / `_finish`):
the patch embedding (conv1, no bias), the class token prepended, positional embeddings added,
``ln_pre``, the unchanged blocks ``x + attn(ln_1(x)); x + mlp(ln_2(x))``; in the modified block
q, k, v are ``F.linear(ln_1(x), in_proj_weight, in_proj_bias).chunk(3)`` split into heads of
``head_dim = width // heads`` and the attention scale is ``head_dim ** -0.5``; the head outputs
are concatenated and passed through ``out_proj`` (weight and bias); then ``ln_post`` and ``@ proj``
on every token.  The upstream repositories use OpenAI CLIP's own ``VisionTransformer`` (SCLIP,
NACLIP, CLIP Surgery), a vendored open_clip (ClearCLIP) or an mmseg ViT (MaskCLIP); none of them
has layer scale, so models with ``ls_init_value`` are rejected here rather than guessed.

Positional embeddings for a grid other than the native one (per-method option ``pos``):

* ``"sclip"`` (SCLIP, ClearCLIP and NACLIP, the same code): only when the token count differs
  from the embedding's (``x.shape[1] != positional_embedding.shape[0]``), the patch part reshaped
  to [1, D, s, s] (s = sqrt(N)) and resampled with
  ``F.interpolate(pe, scale_factor=((gh + 0.1) / s, (gw + 0.1) / s), mode='bicubic')``
  (``align_corners`` default False; NACLIP spells out ``align_corners=False,
  recompute_scale_factor=False``, the same thing), no antialias.  Because the scale factor is
  passed, torch maps output pixel i to source ``(i + 0.5) * s / (g + 0.1) - 0.5``, *not* the
  ``(i + 0.5) * s / g - 0.5`` of ``size=``: the "+0.1" shifts the sampling grid (Keys cubic,
  a = -0.75, border-clamped taps).  A grid with as many tokens as the native one (e.g. 7x28 for
  a 14x14 model) is not resampled at all (upstream quirk, kept).
* ``"surgery"`` (CLIP Surgery): ``F.interpolate(pe, (g, g), mode='bilinear')`` (align_corners
  False, no antialias) with ``g = int(sqrt(L - 1))``: square grids only.  Upstream also
  overwrites ``positional_embedding.data`` with the resampled table, so a later call at another
  size resamples an already resampled table; this transcription always starts from the
  original table.
* ``"mmseg"`` (official MaskCLIP): mmseg ``resize(pe, size=(gh, gw), mode='bicubic',
  align_corners=False)``, i.e. ``F.interpolate(size=...)`` without antialias, when the token
  count differs.
* ``"gem"`` (GEM / gem_torch 1.0.1 on open_clip): ``F.interpolate(pe, size=(gh, gw),
  mode='bicubic', antialias=True)`` when the grid differs from the native one.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = ["MethodOutput", "POS_MODES", "resample_pos_embed", "plain_clip", "maskclip",
           "maskclip_official", "surgery", "feature_surgery", "sclip", "clearclip", "naclip",
           "naclip_omega", "naclip_omega_direct", "cosine_maps", "sharpen_attention_"]

POS_MODES = ("sclip", "surgery", "mmseg", "gem")


class MethodOutput(NamedTuple):
    tokens: torch.Tensor                 # [B, 1+N, E]
    maps: Optional[torch.Tensor] = None  # [B, T, gh, gw]


# ----------------------------------------------------------------------------- shared pieces
def _check_visual(visual):
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("attentional pooling towers are not what the upstream code runs")
    for blk in visual.transformer.resblocks:
        if not isinstance(blk.ls_1, torch.nn.Identity) or not isinstance(blk.ls_2, torch.nn.Identity):
            raise NotImplementedError("layer scale (ls_init_value) has no upstream counterpart")
    if getattr(visual, "final_ln_after_pool", False):
        raise NotImplementedError("final_ln_after_pool towers are not what the upstream code runs")


def _grid(visual, pixels):
    p = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    return pixels.shape[-2] // p, pixels.shape[-1] // p


def resample_pos_embed(pe: torch.Tensor, grid, mode: str) -> torch.Tensor:
    """The [1+N', D] positional table of a method for a patch grid (gh, gw); see the module doc."""
    gh, gw = grid
    n = pe.shape[0] - 1
    s = int(math.sqrt(n))
    assert s * s == n, "square native grid expected"
    if mode not in POS_MODES:
        raise ValueError(f"pos mode must be one of {POS_MODES}, got {mode!r}")
    cls_pe, patch = pe[:1], pe[1:].reshape(1, s, s, -1).permute(0, 3, 1, 2)
    if mode == "sclip":
        # SCLIP clip/model.py L239-242 (+ L263-281); NACLIP clip/model.py L104-107, L134-151;
        # ClearCLIP open_clip/transformer.py L510-513, L569-587.
        if gh * gw + 1 == pe.shape[0]:
            return pe
        h0, w0 = gh + 0.1, gw + 0.1
        out = F.interpolate(patch, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)),
                            mode="bicubic", align_corners=False, recompute_scale_factor=False)
        assert out.shape[-2:] == (gh, gw), out.shape
    elif mode == "surgery":
        # CLIP_Surgery clip/clip_surgery_model.py L333-341 (square only).
        if gh != gw:
            raise ValueError("CLIP Surgery's positional resampling assumes a square grid")
        if gh == s:
            return pe
        out = F.interpolate(patch, (gh, gh), mode="bilinear")
    elif mode == "mmseg":
        # MaskCLIP mmseg/models/backbones/vit.py L367-380, L383-410.
        if gh * gw + 1 == pe.shape[0]:
            return pe
        out = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
    else:
        # gem_torch 1.0.1 gem/gem_utils.py resample_abs_pos_embed (antialias=True).
        if (gh, gw) == (s, s):
            return pe
        out = F.interpolate(patch, size=(gh, gw), mode="bicubic", antialias=True)
    return torch.cat([cls_pe, out.permute(0, 2, 3, 1).reshape(gh * gw, -1)], 0)


def _stem(visual, pixels, pos: str) -> torch.Tensor:
    """conv1 → class token → + positions → ln_pre: [B, 1+N, D] (batch first)."""
    _check_visual(visual)
    x = visual.conv1(pixels)
    b, d = x.shape[:2]
    x = x.reshape(b, d, -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, d).expand(b, 1, d)
    x = torch.cat([cls, x], 1)
    x = x + resample_pos_embed(visual.positional_embedding, _grid(visual, pixels), pos).to(x.dtype)
    return visual.ln_pre(x)


def _block(blk, x: torch.Tensor) -> torch.Tensor:
    """An unchanged open_clip block on a batch-first stream (open_clip runs blocks LND)."""
    return blk(x.permute(1, 0, 2)).permute(1, 0, 2)


def _qkv(blk, y: torch.Tensor):
    """q, k, v [B, H, L, d] of ``F.linear(y, in_proj_weight, in_proj_bias).chunk(3, -1)``."""
    attn = blk.attn
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    b, l, d = q.shape
    h = attn.num_heads

    def heads(t):
        return t.reshape(b, l, h, d // h).transpose(1, 2)
    return heads(q), heads(k), heads(v)


def _merge_out(blk, o: torch.Tensor) -> torch.Tensor:
    """Concatenate heads [B, H, L, d] → [B, L, D] and apply out_proj (weight + bias)."""
    b, h, l, d = o.shape
    return blk.attn.out_proj(o.transpose(1, 2).reshape(b, l, h * d))


def _scale(blk) -> float:
    return (blk.attn.embed_dim // blk.attn.num_heads) ** -0.5


def _finish(visual, x: torch.Tensor) -> torch.Tensor:
    return visual.ln_post(x) @ visual.proj


def cosine_maps(tokens: torch.Tensor, text: torch.Tensor, grid) -> torch.Tensor:
    """SCLIP clip_segmentor.py L63-71 (and NACLIP naclip.py L58-67, ClearCLIP
    clearclip_segmentor.py L123-129): normalize tokens, drop the class token, ``@ text.T`` with the
    text normalized, reshape to the patch grid → [B, T, gh, gw]."""
    feats = tokens / tokens.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = feats[:, 1:] @ text.T
    return logits.permute(0, 2, 1).reshape(tokens.shape[0], text.shape[0], *grid)


def _out(visual, tokens, text, pixels) -> MethodOutput:
    maps = None if text is None else cosine_maps(tokens, text, _grid(visual, pixels))
    return MethodOutput(tokens, maps)


def plain_clip(visual, pixels, text=None, *, pos: str = "gem") -> MethodOutput:
    """Unmodified CLIP: every block as open_clip runs it (the baseline every method differs from)."""
    x = _stem(visual, pixels, pos)
    for blk in visual.transformer.resblocks:
        x = _block(blk, x)
    return _out(visual, _finish(visual, x), text, pixels)


# ----------------------------------------------------------------------------- ClearCLIP family
def _clearclip_attention(blk, y, model_type: str):
    """ClearCLIP open_clip/transformer.py L589-622 ``custom_attn`` on y = ln_1(x) → [B, L, D].

    vanilla:   softmax(s·q kᵀ) v          MaskCLIP: identity attention (softmax of a mask that is
    SCLIP:     (softmax(s·q qᵀ) + softmax(s·k kᵀ)) v     0 on the diagonal, -inf elsewhere) → v
    ClearCLIP: softmax(s·q qᵀ) v          all followed by out_proj; s = head_dim ** -0.5.
    """
    q, k, v = _qkv(blk, y)
    s = _scale(blk)
    if model_type == "vanilla":
        a = torch.softmax((q @ k.transpose(-1, -2)) * s, -1)
    elif model_type == "MaskCLIP":
        n = q.shape[-2]
        mask = torch.full((n, n), float("-inf"), dtype=q.dtype)
        mask.fill_diagonal_(0)
        a = torch.softmax(mask, -1).expand(q.shape[0], q.shape[1], n, n)
    elif model_type == "SCLIP":
        a = torch.softmax((q @ q.transpose(-1, -2)) * s, -1) + \
            torch.softmax((k @ k.transpose(-1, -2)) * s, -1)
    elif model_type == "ClearCLIP":
        a = torch.softmax((q @ q.transpose(-1, -2)) * s, -1)
    else:
        raise ValueError(f"unknown ClearCLIP model_type {model_type!r}")
    return _merge_out(blk, a @ v)


def clearclip(visual, pixels, text=None, *, model_type: str = "ClearCLIP",
              ignore_residual: bool = True, last_n_layers: int = 1,
              pos: str = "sclip") -> MethodOutput:
    """ClearCLIP (Lan et al., ECCV 2024): the last block's output is out_proj(softmax(s·q qᵀ)·v).

    Source: mc-lan/ClearCLIP @ ad68a404d55d48d27330b93554eb64a234ff717f,
    open_clip/transformer.py ``VisionTransformer.forward`` L500-567, ``custom_attn`` L589-622,
    ``interpolate_pos_encoding`` L569-587; clearclip_segmentor.py ``forward_feature`` L113-136.

    * Blocks: the first L - last_n_layers run unchanged.  For each of the last `last_n_layers`
      blocks (default 1), with x its input: ``output += custom_attn(ln_1(x))`` when
      ``ignore_residual`` (default True) -- no residual, no FFN -- else
      ``output += x + attn; output += mlp(ln_2(...))`` (x_out = x + attn, x_out + mlp(ln_2(x_out))).
      x then goes through the block unchanged (it only feeds a next modified block).  With the
      default single block: ``x_L = out_proj(softmax(s·q qᵀ)·v)``.
    * q, v come from ln_1 of the block input (the original stream); s = head_dim ** -0.5; the
      class token is one of the L = 1+N keys/values like any patch; the segmentor drops its
      output (``_global_pool``, pool_type 'tok').
    * model_type selects the attention (vanilla / MaskCLIP / SCLIP / ClearCLIP, see
      `_clearclip_attention`).  AMBIGUITY: upstream's configs/base_config.py sets
      ``model_type='vanilla'`` (with ignore_residual=True); the paper's method and demo.py use
      ``'ClearCLIP'``.  The default here is ClearCLIP.
    * Positions: "sclip" rule (module doc).  Upstream runs the model in fp16
      (``precision='fp16'``, inputs ``.half()``); the references here are fp32.
    * Token→map: normalize tokens, ``@`` normalized text (80 ImageNet templates averaged),
      reshape to the grid (`cosine_maps`).
    """
    x = _stem(visual, pixels, pos)
    blocks = visual.transformer.resblocks
    n = len(blocks)
    if not 1 <= last_n_layers <= n:
        raise ValueError(f"last_n_layers must be in 1..{n}")
    for blk in blocks[:n - last_n_layers]:
        x = _block(blk, x)
    output = 0
    for blk in blocks[n - last_n_layers:]:
        a = _clearclip_attention(blk, blk.ln_1(x), model_type)
        if ignore_residual:
            output = output + a
        else:
            x_out = x + a
            output = output + x_out + blk.mlp(blk.ln_2(x_out))
        x = _block(blk, x)
    return _out(visual, _finish(visual, output), text, pixels)


def maskclip(visual, pixels, text=None, *, pos: str = "sclip") -> MethodOutput:
    """MaskCLIP as the later papers implement it: the last block's output is out_proj(v) of
    v = ln_1(x) W_vᵀ + b_v; no residual, no FFN; then ln_post and proj on every token.

    Source: mc-lan/ClearCLIP @ ad68a404d55d48d27330b93554eb64a234ff717f,
    open_clip/transformer.py L604-609 (model_type 'MaskCLIP': softmax of a 0-diagonal / -inf mask,
    i.e. identity attention) with ``ignore_residual=True`` (L525-526) -- the same path as
    `clearclip` with model_type='MaskCLIP'.  This is the "maskclip" of the issue.

    NOTE: the official MaskCLIP code (chongzhou96/MaskCLIP, see `maskclip_official`) keeps the
    residual and the FFN of the last block; SCLIP and NACLIP have no MaskCLIP baseline in their
    code (their tables quote numbers).  Positions: "sclip" rule (ClearCLIP's code).
    """
    return clearclip(visual, pixels, text, model_type="MaskCLIP", ignore_residual=True,
                     last_n_layers=1, pos=pos)


def maskclip_official(visual, pixels, text=None, *, pos: str = "mmseg") -> MethodOutput:
    """Official MaskCLIP (Zhou et al., ECCV 2022), ViT path.

    Source: chongzhou96/MaskCLIP @ 245d31f809be9c1938f8f30561b6bf9ed033d746,
    mmseg/models/backbones/vit.py ``TransformerEncoderLayer.forward`` L94-108 (return_qkv),
    ``VisionTransformer.forward`` L412-464, ``resize_pos_embed`` L383-410;
    mmseg/models/decode_heads/maskclip_head.py ``forward`` L71-121 (``feat = self.proj(v)``),
    ``cls_seg`` L123-127; configs/_base_/models/maskclip_vit16.py (return_qkv=True,
    final_norm=True, skip_last_attn False).

    Last block, x its input, y = ln_1(x):  ``q, k, v = out_proj(W_{q,k,v} y + b)`` (out_proj applied
    to each of the three), then ``v = v + x`` (residual kept) and ``v = v + mlp(ln_2(v))`` (FFN
    kept); ``v = ln_post(v)`` (final_norm); feat = v @ proj (the head's 1x1 conv holds CLIP's proj,
    no bias); maps = feat/‖feat‖ · text (text embeddings are normalized in prompt_engineering.py,
    85 templates).  The class token takes part in all earlier blocks; its output is dropped.
    Positions: "mmseg" rule.  Upstream differences not reproduced here (they are properties of
    upstream's re-implemented ViT, not of the method): LayerNorm eps 1e-6 instead of CLIP's 1e-5,
    nn.GELU instead of QuickGELU for OpenAI weights, ImageNet mean/std instead of CLIP's.
    Refinements ``ks_thresh`` (key smoothing) / ``pd_thresh`` (prompt denoising) default to 0 (off).
    """
    x = _stem(visual, pixels, pos)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = _block(blk, x)
    blk = blocks[-1]
    _, _, v = _qkv(blk, blk.ln_1(x))
    v = _merge_out(blk, v) + x
    v = v + blk.mlp(blk.ln_2(v))
    return _out(visual, _finish(visual, v), text, pixels)


# ----------------------------------------------------------------------------- SCLIP
def sclip(visual, pixels, text=None, *, csa: bool = True, pos: str = "sclip") -> MethodOutput:
    """SCLIP (Wang et al., ECCV 2024): correlative self-attention in the last block, MLP kept.

    Source: wangf3014/SCLIP @ b56bd3014b9e8a3ee3450bcfc53700a67d627b7a, clip/model.py
    ``VisionTransformer.forward`` L229-261 (last block L249-251), ``custom_attn`` L283-313,
    ``interpolate_pos_encoding`` L263-281; clip_segmentor.py ``forward_feature`` L59-78.

    Last block, x its input, y = ln_1(x) (the original stream), s = head_dim ** -0.5:
        x = x + out_proj((softmax(s·q qᵀ) + softmax(s·k kᵀ)) · v)
        x = x + mlp(ln_2(x))
    (the two softmaxes are summed, not averaged; q, k, v with their in_proj biases).  The
    residual and the FFN are kept.  The class token is a key/value like any patch.  csa=False
    gives vanilla attention (= CLIP).  Tokens: ln_post(x) @ proj; maps: `cosine_maps`.
    Positions: "sclip" rule.
    """
    x = _stem(visual, pixels, pos)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = _block(blk, x)
    blk = blocks[-1]
    x = x + _clearclip_attention(blk, blk.ln_1(x), "SCLIP" if csa else "vanilla")
    x = x + blk.mlp(blk.ln_2(x))
    return _out(visual, _finish(visual, x), text, pixels)


# ----------------------------------------------------------------------------- NACLIP
def naclip_omega(gh: int, gw: int, std: float = 5.0, dtype=torch.float32) -> torch.Tensor:
    """NACLIP's attention addition Ω [1+N, 1+N], built exactly as upstream.

    Source: sinahmr/NACLIP @ 0cac3a651f753b11315ea799cfbfabf79da1bd76, clip/model.py
    ``gaussian_window`` L153-165, ``get_attention_addition`` L167-176, used at L189-195.

    The window is (2·gh-1) x (2·gw-1): per axis ``torch.linspace(start·c, (start+dim-1)·c, dim)``
    with start = -(dim-1)/2 and c = 1/(std·√2) in float32, value ``exp(-Σ k²)``, i.e.
    exp(-(Δy² + Δx²) / (2·std²)) with the peak 1 at distance 0 (unnormalized).  A one-hot image per
    patch (a, b) is convolved (``F.conv2d(..., padding='same')``) with the window, so
    Ω[(a,b), (y,x)] = window[y-a+gh-1, x-b+gw-1]: a Gaussian of the patch-grid distance (units of
    patches, row-major token order, on the grid of this very input -- (H//p, W//p), not the
    native one).  A zero row and a zero column are prepended for the class token (the class token
    gets no neighbourhood bonus and gives none).  Ω is added, unscaled, to s·k kᵀ; it is the same
    for every head and image.
    """
    def window(d1, d2):
        c = 1 / (std * math.sqrt(2))
        ks = []
        for dim in (d1, d2):
            start = -(dim - 1) / 2.0
            ks.append(torch.linspace(start * c, (start + (dim - 1)) * c, steps=dim, dtype=torch.float))
        return torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))

    win = window(2 * gh - 1, 2 * gw - 1)
    m = torch.einsum("ij,kl->ijkl", torch.eye(gh), torch.eye(gw)).permute(0, 3, 1, 2).contiguous()
    out = F.conv2d(m.view(-1, gh, gw).unsqueeze(1), win[None, None], padding="same").squeeze(1)
    out = out.view(gh * gw, gh * gw)
    out = torch.vstack([torch.zeros((1, gh * gw)), out])
    out = torch.hstack([torch.zeros((gh * gw + 1, 1)), out])
    return out.to(dtype)


def naclip_omega_direct(gh: int, gw: int, std: float = 5.0) -> torch.Tensor:
    """Ω from its closed form exp(-‖p - q‖² / (2 std²)) (float64), zero class-token row/column:
    an independent check of `naclip_omega`."""
    yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                            torch.arange(gw, dtype=torch.float64), indexing="ij")
    p = torch.stack([yy.reshape(-1), xx.reshape(-1)], -1)
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    out = torch.zeros(gh * gw + 1, gh * gw + 1, dtype=torch.float64)
    out[1:, 1:] = torch.exp(-d2 / (2 * std ** 2))
    return out


def naclip(visual, pixels, text=None, *, gaussian_std: float = 5.0, attn_strategy: str = "naclip",
           arch: str = "reduced", pos: str = "sclip") -> MethodOutput:
    """NACLIP (Hajimiri et al., WACV 2025): neighbourhood-aware k-k attention in the last block,
    no residual, no FFN.

    Source: sinahmr/NACLIP @ 0cac3a651f753b11315ea799cfbfabf79da1bd76, clip/model.py
    ``set_params`` L87-92, ``forward`` L94-132 (last block L114-121), ``interpolate_pos_encoding``
    L134-151, ``custom_attn`` L178-232; naclip.py defaults L20-22, ``forward_feature`` L54-69.

    Defaults (naclip.py): arch='reduced', attn_strategy='naclip', gaussian_std=5.
    Last block, x its input, y = ln_1(x) (original stream), s = head_dim ** -0.5:
        arch 'reduced':  x_L = out_proj(A · v)                         (no residual, no FFN)
        arch 'vanilla':  x_L = x + out_proj(A · v);  x_L += mlp(ln_2(x_L))
    with A by attn_strategy:
        'naclip': softmax(s·k kᵀ + Ω)     (Ω = `naclip_omega` on this input's patch grid)
        'nonly':  softmax(Ω · mean(s·|q_i|·|k_j|))   (a Python scalar over all heads, images and
                  pairs; upstream builds [heads, L, L] zeros, so batch size 1 only)
        'kk':     softmax(s·k kᵀ)
        'csa':    softmax(s·q qᵀ) + softmax(s·k kᵀ)   (requires arch 'vanilla' = SCLIP)
        'vanilla': softmax(s·q kᵀ)
    The class token is a key/value for every patch (with Ω = 0 in its row and column).
    Tokens: ln_post(x_L) @ proj; maps: drop the class token, normalize, ``@`` normalized text
    (`cosine_maps`, same result).  Positions: "sclip" rule.
    """
    if arch not in ("reduced", "vanilla"):
        raise ValueError(f"arch must be 'reduced' or 'vanilla', got {arch!r}")
    if attn_strategy not in ("naclip", "nonly", "kk", "csa", "vanilla"):
        raise ValueError(f"unknown attn_strategy {attn_strategy!r}")
    if attn_strategy == "csa" and arch != "vanilla":
        raise ValueError("attn_strategy 'csa' requires arch 'vanilla' (upstream assertion)")
    if attn_strategy in ("naclip", "nonly") and not gaussian_std > 0:
        raise ValueError("gaussian_std must be > 0")
    x = _stem(visual, pixels, pos)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = _block(blk, x)
    blk = blocks[-1]
    q, k, v = _qkv(blk, blk.ln_1(x))
    s = _scale(blk)
    grid = _grid(visual, pixels)
    if attn_strategy in ("naclip", "nonly"):
        omega = naclip_omega(*grid, std=gaussian_std, dtype=x.dtype)
        if attn_strategy == "naclip":
            logits = (k @ k.transpose(-1, -2)) * s + omega
        else:
            if x.shape[0] != 1:
                raise ValueError("attn_strategy 'nonly' works on one image at a time upstream")
            scal = (s * q.norm(dim=-1)[..., None, :] * k.norm(dim=-1)[..., :, None]).mean().item()
            logits = torch.zeros_like(k @ k.transpose(-1, -2)) + omega * scal
        a = torch.softmax(logits, -1)
    elif attn_strategy == "kk":
        a = torch.softmax((k * s) @ k.transpose(-1, -2), -1)
    elif attn_strategy == "csa":
        a = torch.softmax((q @ q.transpose(-1, -2)) * s, -1) + \
            torch.softmax((k @ k.transpose(-1, -2)) * s, -1)
    else:
        a = torch.softmax((q * s) @ k.transpose(-1, -2), -1)
    out = _merge_out(blk, a @ v)
    if arch == "vanilla":
        out = x + out
        out = out + blk.mlp(blk.ln_2(out))
    return _out(visual, _finish(visual, out), text, pixels)


# ----------------------------------------------------------------------------- CLIP Surgery
def feature_surgery(image_features: torch.Tensor, text_features: torch.Tensor,
                    redundant_feats: Optional[torch.Tensor] = None, t: float = 2) -> torch.Tensor:
    """CLIP Surgery's "feature surgery" similarity [B, n, T] (class token included in n).

    Source: xmed-lab/CLIP_Surgery @ d4696d47f49cfe70f49140afe5eb94f94c5f59bc, clip/clip.py
    ``clip_feature_surgery`` L287-308 (demo.py L60-68: image features L2-normalized, text features
    from ``encode_text_with_prompt_ensemble``, 85 templates, normalized).

    Without `redundant_feats`:  w = softmax(2 · cls·textᵀ) / mean(softmax(...)) per class (from the
    class token, i.e. image_features[:, :1]); feats[b,i,t,:] = img[b,i,:] ⊙ text[t,:] · w[t];
    feats -= mean over t; similarity = Σ_c feats.  Closed form:
        sim[b,i,t] = w[b,t]·cos[b,i,t] − mean_t' (w[b,t']·cos[b,i,t'])
    With `redundant_feats` (e.g. the embedding of the empty prompt): img @ (text − redundant)ᵀ.
    `t` is unused upstream (the 2 is hard-coded).  AMBIGUITY: upstream reshapes w to (1, 1, T, 1),
    which only runs for batch size 1; here w is per image (identical for B = 1).
    """
    if redundant_feats is not None:
        return image_features @ (text_features - redundant_feats).t()
    prob = image_features[:, :1, :] @ text_features.t()
    prob = (prob * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)                          # [B, 1, T]
    b, n_t, n_i, c = image_features.shape[0], text_features.shape[0], \
        image_features.shape[1], image_features.shape[2]
    feats = image_features.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
    feats = feats * w.reshape(b, 1, n_t, 1)
    feats = feats - feats.mean(2, keepdim=True)
    return feats.sum(-1)


def surgery(visual, pixels, text=None, *, blocks: int = 6, use_feature_surgery: bool = True,
            redundant_feats: Optional[torch.Tensor] = None, pos: str = "surgery") -> MethodOutput:
    """CLIP Surgery (Li et al., arXiv 2304.05653 / Pattern Recognition 2025), ViT path.

    Source: xmed-lab/CLIP_Surgery @ d4696d47f49cfe70f49140afe5eb94f94c5f59bc,
    clip/clip_surgery_model.py ``Attention`` L57-103, ``ResidualAttentionBlock.forward`` L253-280,
    ``VisionTransformer.forward`` L314-355 (architecture surgery on the last 6 blocks L320-327:
    ``for i in range(1, 7)``, comment "surgery 7, maskclip 2"); clip/clip.py
    ``clip_feature_surgery`` L287-308, ``get_similarity_map`` L271-284.

    The last `blocks` (6) blocks run a dual path.  In each, with x_ori the original stream and
    y = ln_1(x_ori) (q/k/v always come from LN1 of the ORIGINAL stream, also for the new path),
    s = head_dim ** -0.5 (ViT: no L2 norm, scale not multiplied; the ResNet branch differs):
        a_ori = out_proj(softmax(s·q kᵀ) · v)            a_new = out_proj(softmax(s·v vᵀ) · v)
        x_ori = x_ori + a_ori;  x_ori = x_ori + mlp(ln_2(x_ori))       (CLIP's block, unchanged)
        x_new = x_new + a_new                                           (no FFN on the new path)
    where the new path starts at the first surgery block's input (x_new = x_in + a_new there).
    After the last block the class token of the new path is replaced by the original path's
    (``x[0] = x_ori[0]``); tokens = ln_post(x_new) @ proj.
    Maps: `feature_surgery` of the L2-normalized tokens (class token included, as upstream uses it
    for the weights) and normalized text, class token dropped, reshaped to the (square) grid;
    ``use_feature_surgery=False`` gives plain cosines.  Upstream then min-max normalizes each
    class over the patches and bilinearly resizes (get_similarity_map).  Positions: "surgery".
    """
    x = _stem(visual, pixels, pos)
    rb = visual.transformer.resblocks
    n = len(rb)
    if not 1 <= blocks <= n:
        raise ValueError(f"blocks must be in 1..{n}")
    for blk in rb[:n - blocks]:
        x = _block(blk, x)
    x_new, x_ori = None, x
    for blk in rb[n - blocks:]:
        q, k, v = _qkv(blk, blk.ln_1(x_ori))
        s = _scale(blk)
        a_ori = _merge_out(blk, torch.softmax((q @ k.transpose(-1, -2)) * s, -1) @ v)
        a_new = _merge_out(blk, torch.softmax((v @ v.transpose(-1, -2)) * s, -1) @ v)
        x_new = (x_ori if x_new is None else x_new) + a_new
        x_ori = x_ori + a_ori
        x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
    x_new = torch.cat([x_ori[:, :1], x_new[:, 1:]], 1)
    tokens = _finish(visual, x_new)
    maps = None
    if text is not None:
        grid = _grid(visual, pixels)
        img = tokens / tokens.norm(dim=-1, keepdim=True)
        txt = text / text.norm(dim=-1, keepdim=True)
        sim = feature_surgery(img, txt, redundant_feats) if use_feature_surgery else img @ txt.t()
        maps = sim[:, 1:].permute(0, 2, 1).reshape(tokens.shape[0], text.shape[0], *grid)
    return MethodOutput(tokens, maps)


# ----------------------------------------------------------------------------- test weights
@torch.no_grad()
def sharpen_attention_(visual, qk_gain: float = 2.0, out_gain: float = 2.0):
    """Make a random tower attention-dominant: scale every block's q and k projections (weights
    and biases) by `qk_gain` (logits × qk_gain², so attention is peaked instead of near uniform)
    and out_proj by `out_gain` (the attention branch outweighs the residual stream).  With the
    near-uniform attention of a random init the methods' attention choices barely move the maps,
    and parity tests would have no teeth."""
    for blk in visual.transformer.resblocks:
        d = blk.attn.embed_dim
        blk.attn.in_proj_weight[: 2 * d] *= qk_gain
        blk.attn.in_proj_bias[: 2 * d] *= qk_gain
        blk.attn.out_proj.weight *= out_gain
        blk.attn.out_proj.bias *= out_gain
    return visual
