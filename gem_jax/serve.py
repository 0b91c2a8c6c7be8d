"""`gem-jax serve`: a local interactive demo in the browser (Gradio), like upstream GEM's app.py.

    pip install -e ".[demo]"
    gem-jax serve                                   # the bundled toy model, offline
    gem-jax serve --model openai/clip-vit-base-patch16 --port 7860

Upload an image (or keep the generated scene), type prompts (one per line, or comma-separated),
choose the method and GEM's knobs, and see one overlay per prompt.  The same function is an
HTTP API (`gradio_client.Client(url).predict(..., api_name="/heatmaps")`).

The default is the bundled toy CLIP (gem_jax/assets/toy_clip): it knows six colours and five
shapes ("red circle", "blue square", ...) and localizes objects by colour; it is not a model for
photos.  For it, "contrast with the class prompts" subtracts the mean map over its 30 class
prompts before normalizing (gem_jax.demo.relative_maps), which it needs (see its README).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_PROMPTS = 16
EXAMPLE_SCENE = 3  # the generated scene shown first: a purple cross, an orange square, a green star

SERVE_EPILOG = """\
examples:
  gem-jax serve                                         # toy model, http://127.0.0.1:7860
  gem-jax serve --model openai/clip-vit-base-patch16    # real weights (cached or downloaded)
  gem-jax serve --model ckpt/b16 --port 8000 --host 0.0.0.0   # reachable from other machines

needs the [demo] extra: pip install "gem-jax[demo]" (Gradio).
"""


def split_prompts(text: str) -> list[str]:
    """Prompts from the text box: one per line, or comma-separated; blanks dropped."""
    parts = [p.strip() for line in (text or "").splitlines() for p in line.split(",")]
    return [p for p in parts if p]


def register(subparsers) -> None:
    from .argtypes import DTYPES, gem_depth, model_source, nonneg_int, positive_int, temperature
    p = subparsers.add_parser(
        "serve", help="local interactive demo in the browser (Gradio; extra [demo])",
        description="Start a local web demo: upload an image, type prompts, choose the method and "
                    "knobs, see GEM heatmap overlays.  Defaults to the bundled toy model (offline).",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None, type=model_source, metavar="SRC",
                   help="hub id or local checkpoint directory (default: the bundled toy model, "
                        "which knows coloured shapes only)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and compute dtype (default float32)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=positive_int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT})")
    g = p.add_argument_group("initial values of the knobs (all adjustable in the page)")
    g.add_argument("--size", type=positive_int, default=None, metavar="PX",
                   help="input size (default: 64 for the toy model, 448 otherwise)")
    g.add_argument("--gem-depth", type=gem_depth, default=None, metavar="D",
                   help="GEM depth (default 7, or the model's layers+1 if smaller)")
    g.add_argument("--iters", type=nonneg_int, default=1, metavar="N",
                   help="self-self attention iterations (default 1)")
    g.add_argument("--temp", type=temperature, default=argparse.SUPPRESS, metavar="T",
                   help="inverse temperature or 'adaptive' (default: 5 for the toy model, "
                        "adaptive otherwise)")
    p.set_defaults(func=run, _parser=p)


class Demo:
    """The model and the one function the page (and its HTTP API) calls."""

    def __init__(self, model, source: str, *, toy: bool):
        self.model, self.source, self.toy = model, source, toy
        v = model.config.vision
        self.patch, self.max_depth = v.patch_size, v.layers + 1

    def heatmaps(self, image, prompts_text: str, method: str, gem_depth, iters, temp: str,
                 size, template: str, contrast: bool, alpha: float):
        """-> (overlays [(PIL image, prompt)], info dict).  Raises ValueError for bad input."""
        from . import viz
        from .argtypes import temperature
        from .demo import CLASS_PROMPTS, relative_maps
        from .preprocess import to_rgb
        if image is None:
            raise ValueError("upload an image first")
        prompts = split_prompts(prompts_text)
        if not prompts:
            raise ValueError("type at least one prompt (one per line, or comma-separated)")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts at a time, got {len(prompts)}")
        template = template or "{}"
        if "{}" not in template:
            raise ValueError("the template must contain {} where the prompt goes")
        size, gem_depth, iters = int(size), int(gem_depth), int(iters)
        if size < self.patch:
            raise ValueError(f"size {size} is smaller than one {self.patch}-pixel patch")
        if size > 1024:
            raise ValueError(f"size {size} is larger than 1024 (the demo's limit)")
        if not 2 <= gem_depth <= self.max_depth:
            raise ValueError(f"GEM depth must be in 2..{self.max_depth} for this model")
        try:
            t = temperature(str(temp))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"temperature: {e}") from None
        img = to_rgb(image)
        contrast = bool(contrast) and self.toy
        texts = [template.format(p) for p in prompts] + (list(CLASS_PROMPTS) if contrast else [])
        kw = dict(template=None, normalize=False)
        if method == "gem":  # GEM's knobs; the other methods run with their upstream defaults
            kw.update(gem_depth=gem_depth, ss_attn_iter=iters, ss_attn_temp=t)
        else:
            kw["method"] = method
        t0 = time.perf_counter()
        pixels = self.model.preprocess([img], size=size)
        raw = np.asarray(self.model.heatmaps(pixels, texts, **kw), np.float32)
        maps = relative_maps(raw[:, :len(prompts)], raw[:, len(prompts):] if contrast else None,
                             subtract_class_mean=contrast)[0]
        seconds = time.perf_counter() - t0
        overlays = [(viz.overlay(img, m, float(alpha), "turbo"), p) for m, p in zip(maps, prompts)]
        peaks = []
        for m in maps:  # the hottest point, in the uploaded image's pixel coordinates
            y, x = np.unravel_index(int(np.argmax(m)), m.shape)
            peaks.append([round((x + 0.5) * img.width / m.shape[1], 1),
                          round((y + 0.5) * img.height / m.shape[0], 1)])
        info = dict(model=self.source, method=method, prompts=prompts, size=size,
                    gem_depth=gem_depth, ss_attn_iter=iters, ss_attn_temp=t,
                    contrast_with_class_prompts=contrast, map_shape=list(maps.shape),
                    image_size=[img.width, img.height], peaks_xy=peaks,
                    seconds=round(seconds, 3))
        return overlays, info


def build_app(demo: Demo, *, size: int, gem_depth: int, iters: int, temp, methods=None):
    """The Gradio Blocks page; its button is also the `/heatmaps` API endpoint."""
    import gradio as gr
    from . import scenes
    from .cli import method_names
    methods = list(methods or method_names())
    scene = scenes.scene(EXAMPLE_SCENE, seed=0, split="test", size=256)
    example = scene.pil()
    toy = demo.toy
    default_prompts = ("\n".join(scenes.prompt(c, s) for c, s in scene.objects) if toy
                       else "cat\nremote control")

    def predict(image, prompts, method, depth, n_iter, t, px, template, contrast, alpha):
        try:
            return demo.heatmaps(image, prompts, method, depth, n_iter, t, px, template, contrast,
                                 alpha)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="gem-jax: GEM heatmaps") as app:
        gr.Markdown(
            "## GEM: open-vocabulary heatmaps (gem-jax)\n"
            f"Model: `{demo.source}`"
            + (" (the bundled **toy** CLIP: it knows six colours and five shapes, e.g. "
               "*red circle*, *blue square*; it localizes colours, not real-world objects)"
               if toy else ""))
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(value=example, type="pil", label="image", image_mode="RGB",
                                 height=320)
                prompts = gr.Textbox(value=default_prompts, lines=3,
                                     label="prompts (one per line, or comma-separated)")
                method = gr.Dropdown(methods, value=methods[0], label="method")
                with gr.Accordion("knobs", open=True):
                    depth = gr.Slider(2, demo.max_depth, value=gem_depth, step=1,
                                      label="GEM depth (modifies the last depth-1 blocks)")
                    n_iter = gr.Slider(0, 5, value=iters, step=1,
                                       label="self-self attention iterations")
                    t = gr.Textbox(value="adaptive" if temp is None else f"{temp:g}",
                                   label="inverse temperature ('adaptive' or a number >= 0)")
                    px = gr.Number(value=size, precision=0, label="input size (pixels)")
                    template = gr.Textbox(value="a photo of a {}.", label="prompt template")
                    contrast = gr.Checkbox(value=toy, interactive=toy,
                                           label="contrast with the toy's 30 class prompts "
                                                 "(toy model only)")
                    alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="overlay opacity")
                run_btn = gr.Button("Compute heatmaps", variant="primary")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="overlays (one per prompt; red = high)", columns=3,
                                     format="png", height=420, object_fit="contain")
                with gr.Accordion("details (knobs used, map shape, hottest point per prompt)",
                                  open=False):
                    info = gr.JSON(label="details")
        inputs = [image, prompts, method, depth, n_iter, t, px, template, contrast, alpha]
        run_btn.click(predict, inputs, [gallery, info], api_name="heatmaps")
        if toy:  # the page opens with the example's maps (the toy takes well under a second)
            app.load(predict, inputs, [gallery, info], api_visibility="private")
    return app


def run(args) -> int:
    from .cli import CLIError, load_model
    # Offline by default: no analytics or version pings from Gradio.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CLIError('gem-jax serve needs Gradio: pip install "gem-jax[demo]" '
                       '(or pip install gradio)') from None
    from .demo import TOY_KNOBS, TOY_MODEL_DIR, TOY_SIZE, toy_model
    toy = args.model is None
    if toy:
        import jax.numpy as jnp
        try:
            model = toy_model(getattr(jnp, args.dtype))
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
        source = f"bundled toy ({TOY_MODEL_DIR.name})"
    else:
        model = load_model(args)
        source = str(args.model)
    layers = model.config.vision.layers
    size = args.size or (TOY_SIZE if toy else 448)
    depth = args.gem_depth or min(7, layers + 1)
    if size < model.config.vision.patch_size:
        args._parser.error(f"--size {size} is smaller than one "
                           f"{model.config.vision.patch_size}-pixel patch of model {source}")
    if depth > layers + 1:
        args._parser.error(f"--gem-depth {depth} is too large for model {source} ({layers} "
                           f"blocks): valid 2..{layers + 1}")
    temp = getattr(args, "temp", TOY_KNOBS["ss_attn_temp"] if toy else None)
    demo = Demo(model, source, toy=toy)
    if toy:  # compile before the first visitor (the page computes the example on load)
        from . import scenes
        scene = scenes.scene(EXAMPLE_SCENE, seed=0, split="test", size=256)
        demo.heatmaps(scene.pil(), "\n".join(scenes.prompt(c, s) for c, s in scene.objects),
                      "gem", depth, args.iters, "adaptive" if temp is None else str(temp), size,
                      "a photo of a {}.", True, 0.5)
    app = build_app(demo, size=size, gem_depth=depth, iters=args.iters, temp=temp)
    print(f"gem-jax serve: http://{args.host}:{args.port} (model {source}; Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True,
        ssr_mode=False, footer_links=["api"])
    return 0
