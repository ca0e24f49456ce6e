"""The dataset-format registry (issue 12): every registered format satisfies one contract — it prepares a tiny input
and, where it can, predicts it back with the same encoding — and has a data config whose keys it declares.
``pytest -k "registry or contract"`` selects these tests."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from hydra import compose, initialize_config_dir

from lowrank_ctr.config import CONF_DIR, UserError
from lowrank_ctr.data import formats
from lowrank_ctr.data.batch import batch_arrays
from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.formats import REGISTRY, get_format, registered
from lowrank_ctr.data.prepare import prepare, write_raw_rows
from lowrank_ctr.export import INPUTS, TensorInputs
from lowrank_ctr.models import build_model
from lowrank_ctr.predict import ServedModel, predict_file, torch_scorer

README = Path(__file__).resolve().parents[1] / "README.md"
BUILTIN = ["avazu", "criteo", "movielens", "synthetic", "tabular"]


def served_random_model(prepared, cfg: dict) -> ServedModel:
    """A randomly initialised model over the prepared schema, served with the prepared vocabularies: enough to check
    that raw rows read back through predict get exactly the prepared encoding (no training needed)."""
    import torch

    torch.manual_seed(0)
    model = build_model("deepfm", prepared.schema, embedding_dim=4, mlp=[8]).eval()
    return ServedModel(torch_scorer(TensorInputs(model).eval()), prepared.schema, dict(cfg), prepared.path / "vocab",
                       "a random model")


def check_contract(fmt, directory: Path) -> None:
    """What every registered format owes: a valid example config, preparation, and predict's reading of the same
    raw rows giving the same encoded rows (hence the same probabilities), or a clear refusal."""
    cfg = fmt.example(directory)
    assert cfg["format"] == fmt.name and fmt.validate(cfg) == []
    prepared = prepare(cfg, progress=False)
    assert prepared.summary["rows"]["train"] > 0 and prepared.summary["bad_rows_skipped"] == 0
    assert prepared.schema.extra["format"] == fmt.name
    raw = fmt.raw_columns(cfg)
    assert {f.name for f in prepared.schema.fields} == set(raw.categorical + raw.numeric + raw.multihot)
    served = served_random_model(prepared, cfg)
    if fmt.cannot_predict:
        with pytest.raises(UserError, match=f"cannot score raw data.format={fmt.name} rows: .{{40,}}"):
            predict_file(served, cfg.get("train_path") or directory / "none", directory / "p.csv")
        return
    if fmt.reads_files:
        source = Path(cfg["train_path"])
    else:
        source = directory / "raw.txt"
        assert write_raw_rows(cfg, source) == prepared.summary["rows"]["train"]
    summary = predict_file(served, source, directory / "p.csv", batch_size=7)
    table = pq.read_table(prepared.path / "train").sort_by("row_id")  # every row is in train: file order
    arrays = batch_arrays(prepared.schema, table)
    out = pd.read_csv(directory / "p.csv")
    assert summary["rows"] == len(out) == table.num_rows
    np.testing.assert_allclose(out["probability"].to_numpy(), served.scorer({k: arrays[k] for k in INPUTS}),
                               atol=1e-6)
    np.testing.assert_array_equal(out["label"].to_numpy(), arrays["label"])
    assert out["probability"].std() > 0  # rows differ, so a shifted or mis-encoded column would show


def test_registry_holds_the_builtin_formats():
    assert sorted(registered()) == BUILTIN
    with pytest.raises(DataError, match=r"data.format='xls' is not known; use one of \['avazu', 'criteo'"):
        get_format("xls")


@pytest.mark.parametrize("name", BUILTIN)
def test_registry_contract_prepare_and_predict_back(name, tmp_path):
    check_contract(get_format(name), tmp_path)


def _data_configs() -> dict[str, dict]:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        out = {}
        for f in sorted((Path(CONF_DIR) / "data").glob("*.yaml")):
            cfg = compose("prepare", overrides=[f"data={f.stem}"])
            from omegaconf import OmegaConf

            out[f.stem] = OmegaConf.to_container(cfg.data, resolve=True)
    return out


def test_registry_contract_every_data_config_names_a_format_that_declares_its_keys():
    configs = _data_configs()
    assert {c["format"] for c in configs.values()} == set(BUILTIN)  # every format has a config, every config a format
    for name, cfg in configs.items():
        fmt = get_format(cfg["format"])
        undeclared = sorted(set(cfg) - set(fmt.all_keys()))
        assert not undeclared, f"conf/data/{name}.yaml has keys {undeclared} that format {fmt.name} does not declare"
        # a composed config is valid, except for the raw files a user must name
        problems = [p for p in fmt.validate(cfg) if "no data file given" not in p]
        assert problems == [], (name, problems)


@pytest.mark.parametrize("cfg,problem", [
    (dict(format="tabular", label_col="y", positive_labels=[1], categorical_cols=["a"]),
     r"data.negative_labels is not set: set data.negative_labels=\[0\]"),
    (dict(format="tabular", label_col="y", positive_labels=[1], negative_labels=[1, 0], categorical_cols=["a"]),
     r"label value\(s\) \['1'\] are in both"),
    (dict(format="tabular", label_col="y", positive_labels=[1], negative_labels="others", categorical_cols=["a"]),
     "data.negative_labels='others' must be a non-empty list"),
    (dict(format="tabular", label_col="y", positive_labels=[], negative_labels=[0], categorical_cols=["a"]),
     "data.positive_labels=\\[\\] must be a non-empty list"),
    (dict(format="tabular", label_col="y", positive_labels=[1], negative_labels=[0], categorical_cols=["y"]),
     "is also a feature column"),
    (dict(format="criteo", min_count=0), "data.min_count=0 must be an integer >= 1"),
    (dict(format="criteo", on_bad_rows="missing"), "missing is for lowrank-ctr-predict only"),
    (dict(format="criteo", valid_path="v.txt"), "give both data.valid_path and data.test_path"),
    (dict(format="movielens", positive_rating=6), "data.positive_rating=6 must be a number >= 0.5 and <= 5.0"),
    (dict(format="synthetic", rows=0), "data.rows=0 must be an integer >= 1"),
    (dict(format="synthetic", rows=10, min_vocab=50, max_vocab=20), "data.min_vocab=50 is more than"),
    (dict(format="synthetic", rows=10, split=[0.5, 0.6, 0.1]), "data.split=.* must be three non-negative fractions"),
])
def test_registry_validates_each_format_config_before_any_work(cfg, problem, tmp_path):
    """Required keys and types come from the format's declaration; the message names the key and the fix."""
    full = {"name": "t", "out_dir": str(tmp_path / "o"), "train_path": str(tmp_path / "never-read.csv"), **cfg}
    if cfg["format"] == "synthetic":
        full.pop("train_path")
    with pytest.raises(DataError, match=problem) as err:
        prepare(full, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()


# The README's worked example: a new format in one file, run from the README itself --------------------------------

def readme_format_example() -> str:
    text = README.read_text()
    section = text.split("### How to extend: a new dataset format", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def registry_snapshot():
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


def test_registry_readme_worked_example_adds_a_format_in_one_file(tmp_path, registry_snapshot):
    namespace: dict = {"__name__": "lowrank_ctr.data.formats.jsonl"}
    exec(compile(readme_format_example(), "README.md (worked example)", "exec"), namespace)
    fmt = formats.get_format("jsonl")
    check_contract(fmt, tmp_path)  # the same contract as every built-in format: prepare, predict back
    from lowrank_ctr.data.datamodule import CTRDataModule

    (tmp_path / "again").mkdir()
    dm = CTRDataModule(fmt.example(tmp_path / "again"), progress=False)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["cat"].shape[1] == 2 and len(batch["label"]) == 20
    with pytest.raises(DataError, match="data.categorical_cols is not set"):  # its declared key is checked
        prepare({"name": "j", "format": "jsonl", "train_path": "x.jsonl", "out_dir": str(tmp_path / "o")})
    conf = yaml.safe_load(re.search(r"```yaml\n(.*?)```", README.read_text().split(
        "### How to extend: a new dataset format", 1)[1], re.S).group(1))
    assert conf["format"] == "jsonl" and set(conf) - {"defaults"} <= set(fmt.all_keys())


def test_registry_readme_synthetic_numbers_match_the_default_config():
    """The README states the default synthetic dataset's size and vocabularies; they are the config's (issue 13)."""
    cfg = yaml.safe_load((Path(CONF_DIR) / "data" / "synthetic.yaml").read_text())

    def short(x: int) -> str:  # 100000 -> "1e5"
        mantissa, exponent = f"{x:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"

    text = README.read_text()
    assert f"vocabularies {cfg['min_vocab']}..{short(cfg['max_vocab'])} by default (`data.max_vocab`)" in text
    assert f"`data.rows` ({short(cfg['rows'])})" in text
    assert f"`data.max_vocab` (largest vocabulary, {short(cfg['max_vocab'])};" in text


def test_registry_plugins_import_every_module_in_order(tmp_path, monkeypatch):
    """The one "every file of this package registers itself" helper behind models, methods and formats."""
    import sys

    from lowrank_ctr.plugins import import_package_modules

    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("ORDER = []\n")
    for name in ("alpha", "beta", "helper"):
        (pkg / f"{name}.py").write_text(f"from plugpkg import ORDER\nORDER.append({name!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import plugpkg

    names = import_package_modules("plugpkg", plugpkg.__path__, skip=("helper",), first=("beta",))
    assert names == ["beta", "alpha"] and plugpkg.ORDER == ["beta", "alpha"]  # first kept; helper never imported
    with pytest.raises(ImportError, match="gamma"):
        import_package_modules("plugpkg", plugpkg.__path__, first=("gamma",))
    for mod in [m for m in sys.modules if m == "plugpkg" or m.startswith("plugpkg.")]:
        monkeypatch.delitem(sys.modules, mod)


def test_registry_entry_refuses_a_second_class_under_a_taken_name():
    from lowrank_ctr.plugins import register_entry

    class A:
        pass

    class B:
        pass

    registry: dict = {}
    first = register_entry(registry, "x", A(), "widget")
    assert register_entry(registry, "x", A(), "widget") is first  # the same class again: kept, no error
    with pytest.raises(TypeError, match=r"widget 'x' is registered twice \(A, B\)"):
        register_entry(registry, "x", B(), "widget")
    with pytest.raises(TypeError, match="needs a name"):
        register_entry(registry, "", B, "widget")
    assert list(registry) == ["x"] and isinstance(registry["x"], A)
