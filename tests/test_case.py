"""Case files: schema, defaults, data sources, and a corpus of malformed cases through the CLI."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from geoinvert import cli
from geoinvert.case import KINDS, REQUIRED, SCHEMA, load_case, schema_markdown, update_doc
from geoinvert.case.load import CaseLoader
from geoinvert.errors import CaseError
from geoinvert.testing import small_case

ROOT = Path(__file__).resolve().parents[1]
CASES = sorted((ROOT / "cases").glob("*.yaml"))

LINEAR = {
    "levels": {"finest": 3},
    "forward": {"kind": "linear"},
    "observations": {"functions": ["x", {"shape": "gaussian", "center": [0.5, 0.5], "width": 0.2}]},
    "data": {"values": [0.1, 0.2]},
    "noise": {"std": 0.1},
}
ELLIPTIC = {
    "domain": {"bounds": [0, 2, 0, 1]},
    "levels": {"finest": 3},
    "forward": {"kind": "elliptic", "dirichlet": {"left": 1.0}},
    "observations": {"points": [[0.5, 0.5], [1.5, 0.5]]},
    "data": {"values": [0.1, 0.2]},
    "noise": {"std": [0.1, 0.2]},
}


def _with(base, path, value):
    """A copy of ``base`` with the dotted ``path`` set (``DELETE`` removes it)."""
    case = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = case
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return case


DELETE = object()

# (id, case dict, key that the message must name)
MALFORMED = [
    ("missing-section", _with(LINEAR, "noise", DELETE), "noise"),
    ("missing-data", _with(LINEAR, "data", DELETE), "data"),
    ("missing-required-key", _with(LINEAR, "forward", {}), "forward.kind"),
    ("unknown-section", _with(LINEAR, "sampeler", {"steps": 3}), "sampeler"),
    ("unknown-key", _with(LINEAR, "prior.corelation_length", 0.3), "prior.corelation_length"),
    ("section-not-mapping", _with(LINEAR, "prior", 3), "prior"),
    ("wrong-type-str", _with(LINEAR, "levels.finest", "four"), "levels.finest"),
    ("wrong-type-float-int", _with(LINEAR, "sampler.steps", 2.5), "sampler.steps"),
    ("wrong-type-bool", _with(LINEAR, "output.figures", "yes please"), "output.figures"),
    ("negative-noise", _with(LINEAR, "noise.std", -1.0), "noise.std"),
    ("zero-noise-in-list", _with(LINEAR, "noise.std", [0.1, 0.0]), "noise.std"),
    ("noise-length", _with(LINEAR, "noise.std", [0.1, 0.1, 0.1]), "noise.std"),
    ("nan-noise", _with(LINEAR, "noise.std", float("nan")), "noise.std"),
    ("data-length", _with(LINEAR, "data.values", [0.1]), "data.values"),
    ("nan-in-data", _with(LINEAR, "data.values", [0.1, float("nan")]), "data.values[1]"),
    ("data-not-numbers", _with(LINEAR, "data.values", ["a", "b"]), "data.values[0]"),
    ("two-data-sources", _with(LINEAR, "data.synthetic", {"truth": "x"}), "data"),
    ("no-data-source", _with(LINEAR, "data", {"variable": "v"}), "data"),
    ("missing-data-file", _with(LINEAR, "data", {"file": "nowhere.csv"}), "data.file"),
    ("missing-truth-file", _with(LINEAR, "data", {"synthetic": {"file": "t.nc"}}),
     "data.synthetic.file"),
    ("missing-mesh", _with(ELLIPTIC, "domain.mesh", "meshes/none.xdmf"), "domain.mesh"),
    ("level-too-high", _with(LINEAR, "levels.finest", 12), "levels.finest"),
    ("level-too-low", _with(LINEAR, "levels.finest", 1), "levels.finest"),
    ("negative-correlation", _with(LINEAR, "prior.correlation_length", -1), "prior.correlation_length"),
    ("bad-prior-kind", _with(LINEAR, "prior.kind", "maturn"), "prior.kind"),
    ("bad-forward-kind", _with(LINEAR, "forward.kind", "parabolic"), "forward.kind"),
    ("point-outside", _with(ELLIPTIC, "observations.points", [[0.5, 0.5], [2.5, 0.5]]),
     "observations.points[1]"),
    ("point-not-pair", _with(ELLIPTIC, "observations.points", [[0.5, 0.5], [0.5]]),
     "observations.points[1]"),
    ("python-import", _with(LINEAR, "observations.functions", ["__import__('os')", "x"]),
     "observations.functions[0]"),
    ("python-attribute", _with(ELLIPTIC, "forward.source", "x.__class__"), "forward.source"),
    ("python-lambda", _with(ELLIPTIC, "forward.source", "(lambda: 1)()"), "forward.source"),
    ("unknown-shape", _with(ELLIPTIC, "forward.source", {"shape": "blob"}), "forward.source"),
    ("unknown-boundary", _with(ELLIPTIC, "forward.dirichlet", {"lefft": 0.0}),
     "forward.dirichlet.lefft"),
    ("bad-bounds", _with(ELLIPTIC, "domain.bounds", [0, -1, 0, 1]), "domain.bounds"),
    ("bounds-length", _with(ELLIPTIC, "domain.bounds", [0, 1, 0]), "domain.bounds"),
    ("no-observations", _with(LINEAR, "observations", {"functions": []}), "observations"),
    ("points-for-linear", _with(LINEAR, "observations.points", [[0.5, 0.5]]), "observations.points"),
    ("quadratic-points", _with(_with(ELLIPTIC, "forward.kind", "quadratic"),
                               "observations.functions", []), "observations.points"),
    ("names-length", _with(LINEAR, "observations.names", ["a"]), "observations.names"),
    ("bad-quantile", _with(LINEAR, "output.quantiles", [0.5, 1.5]), "output.quantiles"),
    ("bad-objective", _with(LINEAR, "sampler.objective", "jefreys"), "sampler.objective"),
    ("negative-seed", _with(LINEAR, "data", {"synthetic": {"truth": "x", "seed": -3}}),
     "data.synthetic.seed"),
]


@pytest.mark.parametrize("name, raw, key", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_case_exits_2_naming_key(tmp_path, capsys, name, raw, key):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"geoinvert: error: {key}: "), err


def test_malformed_corpus_size():
    assert len(MALFORMED) >= 25


@pytest.mark.parametrize("text, key", [
    ("forward: [unclosed", "invalid YAML"),
    ("- just\n- a list\n", "a mapping"),
    ("noise: {std: .nan}\nforward: {kind: linear}\nobservations: {functions: [x]}\n"
     "data: {values: [1]}\n", "noise.std"),
])
def test_unparsable_files(tmp_path, capsys, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["check", str(path)]) == 2
    assert key in capsys.readouterr().err


def test_missing_case_file(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: no such case file" in capsys.readouterr().err


def test_debug_shows_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(LINEAR, "noise.std", -1.0)))
    with pytest.raises(CaseError, match="noise.std"):
        cli.main(["check", str(path), "--debug"])


def test_error_message_format():
    assert str(CaseError("prior.correlation_length", "must be > 0, got -1")) == \
        "prior.correlation_length: must be > 0, got -1"
    assert isinstance(CaseError("a", "b"), ValueError)


def test_unknown_key_suggests_close_match():
    with pytest.raises(CaseError) as err:
        load_case(_with(LINEAR, "sampler.stepz", 3))
    assert "did you mean 'steps'" in str(err.value) and "batch" in str(err.value)


def test_defaults_filled_in():
    case = load_case(LINEAR)
    assert case.config["sampler"]["batch"] == 64
    assert case.config["prior"]["kind"] == "matern"
    assert case.n_obs == 2 and case.noise.tolist() == [0.1, 0.1]
    assert case.text.startswith("levels:")


def test_schema_defaults_and_examples_are_valid():
    for key in SCHEMA:
        values = [yaml.load(key.example, Loader=CaseLoader)]
        values += [] if key.default is REQUIRED or key.default is None else [key.default]
        for value in values:
            value = KINDS[key.kind][0](key.path, value)
            assert key.check is None or key.check(value) is None, (key.path, value)


def test_doc_is_up_to_date(tmp_path):
    doc = ROOT / "docs" / "case-files.md"
    copy_ = tmp_path / "case-files.md"
    copy_.write_text(doc.read_text())
    assert not update_doc(copy_), "docs/case-files.md is stale: run update_doc"
    assert all(f"`{k.path}`" in schema_markdown() for k in SCHEMA)


def test_relative_paths_and_csv_points(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "heads.csv").write_text("x,y,value\n0.5,0.5,1.0\n1.5,0.5,2.0\n")
    raw = _with(ELLIPTIC, "data", {"file": "sub/heads.csv"})
    raw["observations"] = {"names": ["W1", "W2"]}
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(raw))
    case = load_case(path)
    assert case.data.tolist() == [1.0, 2.0]
    assert case.config["observations"]["points"] == [[0.5, 0.5], [1.5, 0.5]]
    assert case.folder == tmp_path and case.name == "case"


def test_csv_coordinates_must_match(tmp_path):
    (tmp_path / "heads.csv").write_text("x,y,value\n0.5,0.5,1.0\n1.0,0.5,2.0\n")
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(_with(ELLIPTIC, "data", {"file": "heads.csv"})))
    with pytest.raises(CaseError, match="^data.file: coordinates differ"):
        load_case(path)


def test_netcdf_data_file(tmp_path):
    import xarray as xr
    xr.Dataset({"head": ("obs", [1.0, 2.0])}).to_netcdf(tmp_path / "d.nc")
    raw = _with(ELLIPTIC, "data", {"file": "d.nc", "variable": "head"})
    assert load_case(raw, folder=tmp_path).data.tolist() == [1.0, 2.0]
    with pytest.raises(CaseError, match="^data.variable: no variable 'heda'.*did you mean 'head'"):
        load_case(_with(raw, "data.variable", "heda"), folder=tmp_path)


def test_synthetic_truth_from_netcdf(tmp_path):
    import xarray as xr
    truth = np.linspace(0, 1, 64).reshape(8, 8)
    xr.Dataset({"truth": (("y", "x"), truth)}).to_netcdf(tmp_path / "t.nc")
    case = load_case(_with(LINEAR, "data", {"synthetic": {"file": "t.nc", "seed": 1}}),
                     folder=tmp_path)
    np.testing.assert_array_equal(case.truth, truth)
    clean = case.forward()(__import__("torch").as_tensor(truth)[None]).numpy()[0]
    assert case.data.shape == (2,) and np.all(np.abs(case.data - clean) < 5 * case.noise)


def test_synthetic_prior_truth_is_seeded():
    raw = _with(LINEAR, "data", {"synthetic": {"truth": "prior", "seed": 4}})
    a, b = load_case(raw), load_case(raw)
    np.testing.assert_array_equal(a.truth, b.truth)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.truth.shape == (8, 8) and a.truth.std() > 0


def test_scientific_notation_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(LINEAR) + "sampler: {lr: 1e-3}\n")
    assert load_case(path).config["sampler"]["lr"] == 1e-3


def test_builders_shapes():
    import torch
    case = load_case(LINEAR)
    x = case.prior().sample(3, 2)
    assert case.forward(2)(x).shape == (3, 2)
    assert case.posterior(2).log_prob(x).shape == (3,)


def test_a_quadratic_case_observes_the_square_of_each_function():
    """``forward.kind: quadratic`` with two measurement functions observes
    y_k = (int phi_k x)^2 for each, on every level."""
    import torch
    case = load_case(_with(LINEAR, "forward.kind", "quadratic"))
    x = case.prior().sample(3, 3)
    forward = case.forward(3)
    t = torch.as_tensor(x, dtype=torch.float64).reshape(3, -1) @ torch.as_tensor(forward.matrix).T
    assert forward.matrix.shape == (2, 64)
    np.testing.assert_allclose(forward(x).numpy(), t.square().numpy(), rtol=1e-12)
    assert case.forward(1)(case.prior().sample(2, 1)).shape == (2, 2)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_shipped_cases_check(path, capsys):
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "estimated cost" in out
    if path.stem == "default":      # the correction's worst case follows the estimate
        lines = out.splitlines()
        cost = next(i for i, line in enumerate(lines) if line.startswith("estimated cost:"))
        assert lines[cost + 1].startswith("  (the correction may take up to ")


def test_bimodal_case_is_mirror_symmetric():
    import torch
    case = load_case(ROOT / "cases" / "elliptic_bimodal.yaml")
    truth = torch.as_tensor(case.truth)[None]
    forward = case.forward()
    np.testing.assert_allclose(forward(truth), forward(truth.flip(-2)), rtol=1e-8)
    assert not np.allclose(case.truth, case.truth[::-1])


def test_steps_per_level():
    # one number per level from the coarsest; the count must match levels.finest
    from geoinvert.case import estimate_cost, load_case
    finest = load_case(LINEAR).finest
    case = load_case(_with(LINEAR, "sampler.steps", list(range(1, finest + 1))))
    assert case.config["sampler"]["steps"] == list(range(1, finest + 1))
    same = load_case(_with(LINEAR, "sampler.steps", [3] * finest))
    assert estimate_cost(same)[:2] == estimate_cost(load_case(_with(LINEAR, "sampler.steps", 3)))[:2]
    with pytest.raises(CaseError, match=f"^sampler.steps: has 2 values but there are {finest} levels"):
        load_case(_with(LINEAR, "sampler.steps", [5, 5]))
    with pytest.raises(CaseError, match=r"^sampler.steps\[1\]"):
        load_case(_with(LINEAR, "sampler.steps", [5, "many"] + [5] * (finest - 2)))
    with pytest.raises(CaseError, match="^sampler.steps: must be between 1"):
        load_case(_with(LINEAR, "sampler.steps", [0] * finest))


def test_default_steps_follow_the_levels_and_the_kind():
    # unset: sized per stage for the multi-stage flows (stored in the config, so the cost
    # estimate and the result's case show them); one number for the one-level kinds
    from geoinvert.case import estimate_cost
    from geoinvert.inference.config import stage_steps
    for finest in (2, 3, 5):
        case = load_case(_with(LINEAR, "levels.finest", finest))
        assert case.config["sampler"]["steps"] == [stage_steps(level, finest)
                                                   for level in range(1, finest + 1)]
        given = load_case(_with(_with(LINEAR, "levels.finest", finest), "sampler.steps",
                                case.config["sampler"]["steps"]))
        assert estimate_cost(given)[:2] == estimate_cost(case)[:2]
    assert load_case(_with(LINEAR, "sampler.steps", 7)).config["sampler"]["steps"] == 7
    assert load_case(_with(LINEAR, "sampler.kind", "iaf")).config["sampler"]["steps"] == 200
    assert load_case(_with(LINEAR, "sampler.kind", "asvgd")).config["sampler"]["steps"] == \
        [25, 25, 50]


def test_correction_section_defaults_shorthand_and_kind_rules():
    from geoinvert.case import correction_config, load_case, reserved_solves
    from geoinvert.errors import CaseError
    base = yaml.safe_load((ROOT / "cases" / "linear.yaml").read_text())
    config = load_case(base).config
    correction = correction_config(config)
    assert correction.kernel == "auto" and correction.planned == "hmc" and correction.enabled
    # auto is planned as HMC: the same solves
    hmc = dataclasses.replace(correction, kernel="hmc")
    assert correction.solves() == hmc.solves() and correction.reserved() == hmc.reserved()
    off = load_case({**base, "sampler": {**base["sampler"], "correction": "none"}}).config
    assert not correction_config(off).enabled
    assert reserved_solves(off) == off["output"]["samples"]
    search = 8 * 60 + 6 * 4          # the mode search: 8 L-BFGS runs, a Hessian of rank <= 4
    assert reserved_solves(config) == correction_config(config).reserved() + 2 * 500 + search
    no_modes = load_case({**base, "sampler": {**base["sampler"],
                                              "correction": {"modes": False}}}).config
    assert reserved_solves(no_modes) == reserved_solves(config)    # the Laplace coordinates
    no_search = load_case({**base, "sampler": {**base["sampler"], "correction": {
        "modes": False, "coordinates": "flow"}}}).config
    assert reserved_solves(no_search) == correction_config(config).reserved() + 2 * 500
    with pytest.raises(CaseError, match="sampler.correction.kernel"):
        load_case({**base, "sampler": {"correction": {"kernel": "nuts"}}})
    with pytest.raises(CaseError, match="sampler.correction: applies to sampler.kind msign, "
                       "asvgd, iaf, meanfield, composed, not to hmc"):
        load_case({**base, "sampler": {"kind": "hmc", "correction": {"draws": 10}}})
    with pytest.raises(CaseError, match=r"sampler.chains: applies to sampler.kind pcn, .* not "
                       r"to msign \(the flow's correction has its own: "
                       r"sampler.correction.chains\)"):
        load_case({**base, "sampler": {"chains": 8}})
    with pytest.raises(CaseError, match="sampler.blocks: applies to sampler.kind msign, "
                       "asvgd, iaf, composed, not to pcn"):
        load_case({**base, "sampler": {"kind": "pcn", "blocks": 3}})
    with pytest.raises(CaseError, match="sampler.leapfrog: applies to sampler.kind hmc, not "
                       "to mala"):
        load_case({**base, "sampler": {"kind": "mala", "leapfrog": 3}})
    with pytest.raises(CaseError, match="sampler.budget"):
        load_case({**base, "sampler": {"budget": 5000}})
    with pytest.raises(CaseError, match="sampler.correction.kernel: the lifted kernel does "
                       "not share a solve budget"):
        load_case({**base, "sampler": {"budget": 10 ** 6, "correction": {"kernel": "lifted"}}})


def test_a_recipe_sets_the_training_keys_the_case_does_not_give():
    from geoinvert.inference.config import RECIPES
    base = small_case()
    paper = load_case(base).config["sampler"]
    assert paper["recipe"] == "paper" and paper["reverse_weight"] == 1.0
    config = small_case()
    config["sampler"].update(recipe="forward_kl", pool_levels=3)
    s = load_case(config).config["sampler"]
    assert {k: s[k] for k in RECIPES["forward_kl"]} == {**RECIPES["forward_kl"], "pool_levels": 3}
    with pytest.raises(CaseError, match="sampler.recipe"):
        load_case({**base, "sampler": {"recipe": "fast"}})
    with pytest.raises(CaseError, match="sampler.recipe: applies to sampler.kind msign"):
        load_case({**base, "sampler": {"kind": "asvgd", "recipe": "forward_kl"}})


def test_the_shipped_bimodal_case_trains_with_the_forward_kl_recipe():
    s = load_case(ROOT / "cases" / "elliptic_bimodal.yaml").config["sampler"]
    assert (s["recipe"], s["coarse_sampler"], s["pool_levels"], s["pool_warmup"],
            s["reverse_weight"], s["frozen_proposal"], s["lr_warmup"]) == (
        "forward_kl", "laplace", 2, 1.0, 0.0, True, 0.2)


def test_train_options_are_the_case_training_keys():
    from geoinvert.case import train_options
    config = small_case()
    config["sampler"].update(recipe="forward_kl", lr=5e-4, batch=16)
    options = train_options(load_case(config).config)
    assert (options.objective, options.lr, options.batch, options.coarse_sampler,
            options.reverse_weight, options.frozen_proposal) == (
        "jeffreys", 5e-4, 16, "laplace", 0.0, True)
    assert train_options(load_case({**small_case(), "sampler": {"kind": "asvgd"}})
                         .config).objective == "asvgd"


def test_the_chain_keys_come_from_the_chain_config():
    import dataclasses
    from geoinvert.case import KEYS, SAMPLER_KEY_KINDS, chain_config
    from geoinvert.inference.config import ChainConfig
    for f in dataclasses.fields(ChainConfig):
        key = KEYS[f"sampler.{f.name}"]
        assert key.default == f.default and key.doc == f.metadata["doc"]
        assert SAMPLER_KEY_KINDS[f.name] == f.metadata["kinds"]
    config = load_case({**small_case(), "sampler": {"kind": "hmc", "chains": 3, "draws": 7,
                                                    "leapfrog": 5}}).config
    c = chain_config(config)
    assert (c.chains, c.draws, c.warmup, c.leapfrog) == (3, 7, 500, 5)
    assert c.solves("hmc") == 3 * (500 + 7) * 5 and c.solves("mala") == 3 * (500 + 7)
    with pytest.raises(ValueError, match="chains"):
        ChainConfig(chains=0)


def test_every_training_default_is_written_once():
    """The case's training keys take their defaults from TrainOptions (and the steps from
    inference.config.STEPS), as train_msign does."""
    import inspect
    from geoinvert.case import KEYS
    from geoinvert.inference.config import STEPS, TrainOptions
    from geoinvert.inference.trainer import train_msign
    signature = inspect.signature(train_msign).parameters
    assert KEYS["sampler.steps"].default is None is signature["steps"].default   # stage_steps
    assert f"{STEPS} on the finest level" in KEYS["sampler.steps"].doc
    for name in ("batch", "lr", "objective", "coarse_sampler", "pool_levels", "reverse_weight",
                 "frozen_proposal", "pool_warmup", "lr_warmup"):
        assert KEYS[f"sampler.{name}"].default == getattr(TrainOptions, name), name
    for name in ("batch", "lr", "objective", "schedule", "lr_min", "grad_clip", "max_failures",
                 "proposal", "pool"):
        assert signature[name].default == getattr(TrainOptions, name), name


def test_the_flow_keys_come_from_the_flow_config():
    import dataclasses
    from geoinvert.case import KEYS, flow_config
    from geoinvert.inference.config import FlowConfig
    for f in dataclasses.fields(FlowConfig):
        assert KEYS[f"sampler.{f.name}"].default == f.default
    c = flow_config(load_case({**small_case(), "sampler": {"blocks": 2, "hidden": 8,
                                                           "upsampling": "nearest"}}).config)
    assert c.model_options() == {"blocks_per_level": 2, "hidden": 8, "upsampling": "nearest",
                                 "flow": "glow"}
    with pytest.raises(ValueError, match="upsampling"):
        FlowConfig(upsampling="bilinear")
