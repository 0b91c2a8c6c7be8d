"""`gem-jax eval --method NAME` (issue 12): every method of gem_jax.METHODS runs end to end from the
command line with its own protocol defaults (the results JSON's protocol record equals
`method_protocol`'s for that method, the confusion matrix a direct `evaluate` of it); command-line
options override a default; --pamr; unknown methods and knobs that do not apply are usage errors;
--method gem without protocol options is GEM's protocol as before; a --protocol other than the
method's takes that kind's generic defaults; `--dataset oiv7-points` gives the p-mIoU of
`evaluate_points` with a `PointProtocol`.

On a 6-block random checkpoint (GEM's default depth 7 and CLIP Surgery's 6 blocks are valid), with
`--size 32` so that each method's other defaults (windows, templates, names, logit scale,
thresholds, PAMR) stay its own."""

from __future__ import annotations

import json

import pytest

import gem_jax
from gem_jax.eval import protocols as P
from gem_jax.eval.classnames import GEM_TEMPLATE, names_for
from gem_jax.eval.cli import main
from gem_jax.eval.runner import checkpoint_path, evaluate, evaluate_points

from test_eval_cli import make_dataset
from test_oiv7 import make_oiv7
from test_eval_protocols import tiny_model  # noqa: E402

SIZE = ["--size", "32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from gem_jax.convert import save_native
    m = tiny_model(seed=5, layers=6)  # 6 blocks: every method's default knobs are valid
    d = tmp_path_factory.mktemp("tiny6") / "ckpt"
    save_native(d, m.config, m.params, m.tokenizer)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return gem_jax.load(ckpt)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_dataset("voc21", root, n=2, seed=7)
    return root


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def plain(knobs: dict) -> dict:
    """A protocol record as the results JSON holds it."""
    return json.loads(json.dumps(knobs))


# ----------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", gem_jax.METHODS)
def test_every_method_runs_its_own_protocol(capsys, ckpt, model, voc, tmp_path, method):
    out = tmp_path / "r.json"
    rc, so, err = run(capsys, "--dataset", "voc21", "--root", voc, "--model", ckpt,
                      "--method", method, "--out", out, *SIZE)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["status"] == "complete" and res["counts"]["images"] == 2
    # the protocol record is method_protocol's: every default not overridden (windows,
    # templates, names, logit scale, thresholds, PAMR) is the method's own on voc21
    proto = P.method_protocol(model, method, "voc21", size=32)
    assert res["protocol"] == plain(proto.knobs())
    assert res["protocol"]["defaults_from"] == P.METHOD_PROTOCOLS[method].source
    kw = P.protocol_defaults(method, "voc21")
    assert res["protocol"]["protocol"] == kw["kind"]
    assert res["protocol"]["background_threshold"] == kw["threshold"]
    assert ("pamr" in res["protocol"]) == (kw["pamr_steps"] > 0)
    if method == "gem":
        assert res["protocol"]["gem_depth"] == 7 and res["protocol"]["tokens"] == "gem"
    else:
        cls = gem_jax.methods.METHODS[method]
        assert res["protocol"]["method"] == dict(method=method, **cls.defaults)
    # the method reaches the model: the confusion matrix is a direct evaluate of that protocol
    ref = evaluate(model, "voc21", voc, proto, quiet=True)
    assert res["confusion_matrix"] == ref["confusion_matrix"]
    assert f"voc21 [{method}] 2/2 images: mIoU" in so


def test_methods_give_other_results(capsys, ckpt, voc, tmp_path):
    """Teeth for the test above: two methods on one protocol give other predictions."""
    cms = {}
    for method in ("sclip", "naclip"):
        out = tmp_path / f"{method}.json"
        assert run(capsys, "--dataset", "voc20", "--root", voc, "--model", ckpt, "--method", method,
                   "--protocol", "sliding", "--template", "{}", "--names", "mmseg", "--out", out,
                   "--quiet", *SIZE)[0] == 0
        cms[method] = json.loads(out.read_text())["confusion_matrix"]
    assert cms["sclip"] != cms["naclip"]


def test_gem_default_protocol_is_unchanged(capsys, ckpt, model, voc, tmp_path):
    """--method gem (the default) with no protocol option: GEM's protocol as before the method
    flags (448x448, one template, mmseg names, threshold 0.85, the model's logit scale)."""
    out = tmp_path / "g.json"
    rc, so, err = run(capsys, "--dataset", "voc21", "--root", voc, "--model", ckpt, "--limit", "1",
                      "--out", out, "--quiet")
    assert rc == 0, err
    res = json.loads(out.read_text())
    before = GEMProtocolBefore(model)
    want = dict(plain(before.knobs()), defaults_from=P.METHOD_PROTOCOLS["gem"].source)
    assert res["protocol"] == want
    assert res["protocol"]["size"] == [448, 448] and res["protocol"]["templates"] == [GEM_TEMPLATE]
    ref = evaluate(model, "voc21", voc, before, limit=1, quiet=True)
    assert res["confusion_matrix"] == ref["confusion_matrix"]


def GEMProtocolBefore(model):
    """What `gem-jax eval --dataset voc21` built before --method existed."""
    return P.GEMProtocol(model, names_for("voc21", "mmseg"), has_background=True, gem_depth=7,
                         ss_attn_iter=1, ss_attn_temp=None, use_ori=False, logit_scale=None,
                         batch_size=None, background="threshold", threshold=0.85, size=448,
                         template=GEM_TEMPLATE, scores="cosine")


# ----------------------------------------------------------------------------- overrides
def test_cli_options_override_the_methods_defaults(capsys, ckpt, model, voc, tmp_path):
    out = tmp_path / "s.json"
    rc, so, err = run(capsys, "--dataset", "voc21", "--root", voc, "--model", ckpt, "--method",
                      "sclip", "--logit-scale", "30", "--background-threshold", "0.3", "--crop",
                      "16", "--stride", "8", "--template", "{}", "--out", out, "--quiet", *SIZE)
    assert rc == 0, err
    p = json.loads(out.read_text())["protocol"]
    assert (p["logit_scale"], p["background_threshold"], p["crop"], p["stride"]) == \
        (30.0, 0.3, 16, 8)
    # the defaults not overridden stay SCLIP's on voc21
    assert p["area_threshold"] == 0.1 and p["background"] == "both" and p["max_long_side"] == 2048
    want = P.method_protocol(model, "sclip", "voc21", size=32, logit_scale=30.0, threshold=0.3,
                             crop=16, stride=8, templates=["{}"])
    assert p == plain(want.knobs())
    # and without the options, SCLIP's values
    d = P.protocol_defaults("sclip", "voc21")
    assert (d["logit_scale"], d["threshold"], d["crop"], d["stride"]) == (65.0, 0.1, 224, 112)


def test_pamr_flag(capsys, ckpt, voc, tmp_path):
    def pamr_of(*extra):
        out = tmp_path / "p.json"
        rc, so, err = run(capsys, "--dataset", "voc20", "--root", voc, "--model", ckpt, "--out",
                          out, "--force", "--quiet", "--template", "{}", *SIZE, *extra)
        assert rc == 0, err
        return json.loads(out.read_text())["protocol"].get("pamr")
    assert pamr_of() is None                                          # gem: off by default
    assert pamr_of("--pamr", "2") == {"steps": 2, "dilations": [8, 16]}
    assert pamr_of("--method", "naclip") == {"steps": 10, "dilations": [8, 16]}
    assert pamr_of("--method", "naclip", "--pamr", "2")["steps"] == 2
    assert pamr_of("--method", "naclip", "--pamr", "0") is None


def test_knob_flag_and_gem_flags(capsys, ckpt, voc, tmp_path):
    out = tmp_path / "k.json"
    rc, so, err = run(capsys, "--dataset", "voc20", "--root", voc, "--model", ckpt, "--method",
                      "naclip", "--knob", "gaussian_std=2", "--template", "{}", "--out", out,
                      "--quiet", *SIZE)
    assert rc == 0, err
    assert json.loads(out.read_text())["protocol"]["method"] == {"method": "naclip",
                                                                 "gaussian_std": 2.0}
    out = tmp_path / "g.json"
    rc, so, err = run(capsys, "--dataset", "voc20", "--root", voc, "--model", ckpt, "--gem-depth",
                      "3", "--knob", "ss_attn_iter=2", "--temp", "1.5", "--out", out, "--quiet",
                      *SIZE)
    assert rc == 0, err
    p = json.loads(out.read_text())["protocol"]
    assert (p["gem_depth"], p["ss_attn_iter"], p["ss_attn_temp"]) == (3, 2, 1.5)


@pytest.mark.parametrize("argv,message", [
    (["--method", "nosuch"], "invalid choice: 'nosuch'"),
    (["--method", "sclip", "--knob", "gaussian_std=2"],
     "gaussian_std does not apply to method 'sclip'"),
    (["--method", "naclip", "--gem-depth", "3"], "--gem-depth does not apply to method 'naclip'"),
    (["--method", "maskclip", "--temp", "2"], "--temp does not apply to method 'maskclip'"),
    (["--gem-depth", "3", "--knob", "gem_depth=4"], "--gem-depth 3 and --knob gem_depth=4"),
    (["--method", "surgery", "--knob", "blocks=9"], "blocks must be in"),   # needs the model
    (["--knob", "gaussian_std"], "expected KEY=VALUE"),
    (["--crop", "16"], "--crop applies to the sliding protocol only"),
    (["--method", "sclip", "--scores", "minmax"], "--scores minmax applies to the gem protocol"),
    (["--point-threshold", "0.3"], "--point-threshold applies to point-label datasets"),
    (["--method", "surgery", "--background-threshold", "0.5"],
     "surgery prompts the background on voc21 without a threshold"),
])
def test_usage_errors_name_the_problem(capsys, ckpt, voc, tmp_path, argv, message):
    out = tmp_path / "x.json"
    rc, so, err = run(capsys, "--dataset", "voc21", "--root", voc, "--model", ckpt, "--out", out,
                      *SIZE, *argv)
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()
    if message.startswith("--") and "does not apply to method" in message:  # a GEM flag
        assert "set naclip's knobs" in err or "set maskclip's knobs" in err


def test_foreign_protocol_and_default_out_names(capsys, ckpt, model, voc, tmp_path, monkeypatch):
    """--protocol gem with a sliding method: the method's tokens, the gem kind's generic defaults
    (GEM's threshold and template, not ClearCLIP's); the default output names say so."""
    monkeypatch.chdir(tmp_path)
    rc, so, err = run(capsys, "--dataset", "voc21", "--root", voc, "--model", ckpt, "--method",
                      "clearclip", "--protocol", "gem", *SIZE)
    assert rc == 0, err
    assert "voc21 [clearclip, gem protocol] 2/2 images: mIoU" in so
    p = json.loads((tmp_path / "eval-voc21-clearclip-gem.json").read_text())["protocol"]
    want = P.GEMProtocol(model, names_for("voc21", "mmseg"), has_background=True, size=32,
                         method="clearclip", background="threshold", threshold=0.85)
    assert {k: v for k, v in p.items() if k != "defaults_from"} == plain(want.knobs())
    assert "generic gem defaults" in p["defaults_from"] and "not used" in p["defaults_from"]
    assert p["method"] == {"method": "clearclip"} and p["background_threshold"] == 0.85
    # the method's own kind given explicitly is the method's protocol, named by the method only
    assert run(capsys, "--dataset", "voc20", "--root", voc, "--model", ckpt, "--method", "naclip",
               "--protocol", "sliding", "--template", "{}", "--quiet", *SIZE)[0] == 0
    p = json.loads((tmp_path / "eval-voc20-naclip.json").read_text())["protocol"]
    assert p["pamr"]["steps"] == 10 and p["defaults_from"] == P.METHOD_PROTOCOLS["naclip"].source
    assert run(capsys, "--dataset", "voc20", "--root", voc, "--model", ckpt, "--template", "{}",
               "--quiet", *SIZE)[0] == 0
    assert (tmp_path / "eval-voc20-gem.json").is_file()


# ----------------------------------------------------------------------------- OIv7 points
@pytest.fixture(scope="module")
def oiv7(tmp_path_factory):
    root = tmp_path_factory.mktemp("oiv7") / "oiv7"
    return root, make_oiv7(root)


@pytest.mark.parametrize("method,extra,kw", [
    ("gem", [], {}),
    ("naclip", ["--point-threshold", "0.3", "--knob", "gaussian_std=2"],
     dict(threshold=0.3, knobs={"gaussian_std": 2})),
])
def test_oiv7_points_equals_evaluate_points(capsys, ckpt, model, oiv7, tmp_path, method, extra,
                                            kw):
    oiv7, _ = oiv7
    out = tmp_path / "p.json"
    rc, so, err = run(capsys, "--dataset", "oiv7-points", "--root", oiv7, "--model", ckpt,
                      "--method", method, "--out", out, *SIZE, *extra)
    assert rc == 0, err
    res = json.loads(out.read_text())
    proto = P.PointProtocol(model, size=32, method=method, **kw)
    ref = evaluate_points(model, "oiv7-points", oiv7, proto, quiet=True)
    assert res["metrics"] == ref["metrics"] and res["per_class"] == ref["per_class"]
    assert res["protocol"] == plain(proto.knobs())
    assert res["status"] == "complete" and res["counts"]["images"] == 5
    assert f"oiv7-points [{method}] 5/5 images" in so and \
        f"p-mIoU {res['metrics']['p-mIoU']:.2f}" in so
    if method == "naclip":
        assert res["protocol"]["threshold"] == 0.3
        assert res["protocol"]["method"] == {"method": "naclip", "gaussian_std": 2.0}


def test_oiv7_points_threshold_matters(capsys, ckpt, oiv7, tmp_path):
    """Teeth: the point threshold reaches the counts."""
    oiv7, _ = oiv7
    miou = []
    for t in ("0.2", "0.8"):
        out = tmp_path / f"{t}.json"
        assert run(capsys, "--dataset", "oiv7", "--root", oiv7, "--model", ckpt, "--out", out,
                   "--point-threshold", t, "--quiet", *SIZE)[0] == 0
        miou.append(json.loads(out.read_text())["metrics"]["p-mIoU"])
    assert miou[0] != miou[1]


def test_oiv7_points_resume_and_errors(capsys, ckpt, oiv7, tmp_path, monkeypatch):
    oiv7, ids = oiv7
    monkeypatch.chdir(tmp_path)
    base = ["--dataset", "oiv7-points", "--root", oiv7, "--model", ckpt, "--quiet", *SIZE]
    out = tmp_path / "eval-oiv7-points-gem.json"             # the default output name
    assert run(capsys, *base, "--limit", "2", "--checkpoint-every", "1")[0] == 0
    part = json.loads(out.read_text())
    assert part["status"] == "partial" and part["counts"]["images"] == 2
    assert checkpoint_path(out).exists()
    assert run(capsys, *base)[0] == 1                         # never clobbers an unfinished run
    assert run(capsys, *base, "--resume")[0] == 0
    done = json.loads(out.read_text())
    assert done["status"] == "complete" and done["counts"]["images"] == 5
    assert not checkpoint_path(out).exists()
    full = tmp_path / "full.json"
    assert run(capsys, *base, "--out", full)[0] == 0
    assert json.loads(full.read_text())["metrics"] == done["metrics"]
    # options of the segmentation protocols do not apply
    for argv, msg in [(["--pamr", "2"], "--pamr does not apply to --dataset oiv7-points"),
                      (["--background", "both"], "--background does not apply"),
                      (["--template", "imagenet"], "takes one template"),
                      (["--point-threshold", "1.5"], "--point-threshold must be in [0, 1]"),
                      (["--method", "sclip", "--iters", "2"], "--iters does not apply to method")]:
        rc, so, err = run(capsys, *base, "--out", tmp_path / "no.json", *argv)
        assert rc == 2 and msg in err, (argv, err)
        assert not (tmp_path / "no.json").exists()
    # a labelled image missing from disk: an error, or skipped on request
    img = oiv7 / "validation" / f"{ids[0]}.jpg"
    saved = img.read_bytes()
    img.unlink()
    try:
        rc, so, err = run(capsys, *base, "--out", tmp_path / "m.json")
        assert rc == 1 and "missing" in err
        assert run(capsys, *base, "--out", tmp_path / "m.json", "--missing-images", "skip")[0] == 0
        m = json.loads((tmp_path / "m.json").read_text())
        assert m["counts"]["images_missing"] == 1 and m["counts"]["images"] == 4
    finally:
        img.write_bytes(saved)
