"""The public names, finding kinds and remedy names are exactly those of the contract.

The expected lists are written out here, so that this test runs anywhere; when the contract file
sits beside the repository (``../shared/contract.md``, locally and in CI) it is parsed too and
must agree with them, so that a change to either one without the other is caught.
"""

import re
from pathlib import Path

import pytest

import vanishing
from vanishing.diagnose import KINDS, REMEDIES

CONTRACT = Path(__file__).resolve().parents[1] / ".." / "shared" / "contract.md"

#: ``vanishing.__all__``: the contract's API plus the classes its objects are instances of
EXPECTED_ALL = [
    "watch",
    "Monitor",
    "load_run",
    "Run",
    "inspect",
    "Diagnosis",
    "Finding",
    "Remedy",
    "repair",
    "Repair",
    "Candidate",
    "__version__",
]
#: the names the contract's "Python API" section uses as ``vanishing.<name>``
CONTRACT_API = ["Diagnosis", "inspect", "load_run", "watch"]
#: used as ``vanishing.<name>`` by the contract's "Additions"
ADDED_API = ["repair", "theory"]
EXPECTED_KINDS = [
    "vanishing_gradient",
    "exploding_gradient",
    "saturated_activations",
    "dead_units",
    "stalled_layers",
    "non_finite",
]
CONTRACT_REMEDIES = [
    "relu",
    "leaky_relu",
    "prelu",
    "elu",
    "selu",
    "gelu",
    "he_init",
    "xavier_init",
    "orthogonal_init",
    "lecun_init",
    "batch_norm",
    "layer_norm",
    "residual",
    "lstm",
    "gru",
    "gradient_clipping",
    "lower_learning_rate",
    "higher_learning_rate",
    "layerwise_pretraining",
    "input_scaling",
    "forget_gate_bias",
]
#: the contract's "Additions": built (src/vanishing/diagnose/findings.py, docs/diagnosis.md)
ADDED_REMEDIES = ["pre_layer_norm", "learning_rate_warmup", "zero_init_residual"]
EXPECTED_REMEDIES = CONTRACT_REMEDIES + ADDED_REMEDIES
# Pending: of the contract's "Additions (2026-12-01), binding once built", these are not built
# yet, so they are expected in the contract but not in the package: the remedy names below.
# Whoever builds one moves it into the lists above. Built: vanishing.sinks (tested below),
# watch(sinks=, overwrite=), the trainer integrations, vanishing.repair, vanishing.theory,
# run.report / mon.report, the compare, fix and reproduce commands.
PENDING_REMEDIES: list[str] = []


def test_all_is_exactly_the_documented_names():
    assert list(vanishing.__all__) == EXPECTED_ALL
    for name in vanishing.__all__:
        assert getattr(vanishing, name) is not None
    assert set(CONTRACT_API) <= set(EXPECTED_ALL)


def test_the_additions_api_is_reachable_as_the_contract_spells_it():
    import vanishing.repair.transforms  # noqa: F401 - as any import of the package would

    assert callable(vanishing.repair) and vanishing.repair.Repair is vanishing.Repair
    assert vanishing.Candidate is vanishing.repair.Candidate
    r = vanishing.theory.mean_field("tanh", sigma_w2=1.5, sigma_b2=0.05)
    assert {"q_star", "chi1", "depth_scale", "phase"} <= set(dir(r))
    assert callable(vanishing.theory.critical_sigma_w2)
    for name in ADDED_API:
        assert name in dir(vanishing)


def test_finding_kinds_and_remedy_names_are_the_vocabulary():
    assert list(KINDS) == EXPECTED_KINDS
    assert list(REMEDIES) == EXPECTED_REMEDIES
    assert not set(PENDING_REMEDIES) & set(REMEDIES)


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"the contract has no section {title!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def contract() -> str:
    if not CONTRACT.is_file():
        pytest.skip(f"{CONTRACT} is not here: only the embedded lists are checked")
    return CONTRACT.read_text()


def test_embedded_lists_agree_with_the_contract(contract):
    api = _section(contract, "Python API")
    assert sorted(set(re.findall(r"\bvanishing\.([A-Za-z_]\w*)\b", api))) == CONTRACT_API
    kinds = re.findall(r"^\| `(\w+)` \|", _section(contract, "Finding kinds"), re.M)
    assert kinds == EXPECTED_KINDS
    remedies = re.findall(r"`(\w+)`", _section(contract, "Remedy names"))
    assert remedies == CONTRACT_REMEDIES
    additions = _section(contract, "Additions (2026-12-01), binding once built")
    new = re.search(r"New remedy names:(.*?)\n\n", additions, re.S)
    assert new and re.findall(r"`(\w+)`", new.group(1)) == ADDED_REMEDIES + PENDING_REMEDIES


def test_the_sinks_of_the_contract_exist_after_a_plain_import():
    import subprocess
    import sys

    code = (
        "import vanishing; s = vanishing.sinks; "
        "print(all(callable(getattr(s, n)) for n in "
        "('ParquetSink', 'TensorBoardSink', 'MLflowSink', 'WandbSink')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    import inspect as _inspect

    params = _inspect.signature(vanishing.watch).parameters
    assert {"sinks", "overwrite"} <= set(params)
