"""VanishingCallback in a real ``transformers.Trainer`` (tiny random-weight models, CPU).

The truths the records are compared with come from paths that do not go through the monitor:
HF's own logs (``state.log_history``: loss, pre-clip ``grad_norm``) and a second callback that
reads ``p.grad`` and the weights of the named parameters around ``optimizer.step()``.
"""

import json
import math
import warnings

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import vanishing  # noqa: E402
from helpers import assert_thinned_run_equals  # noqa: E402
from vanishing.integrations.transformers import VanishingCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    """Random token ids; the labels are the ids (causal LM) or a class per sequence."""

    def __init__(self, n=64, length=16, vocab=64, classes=None):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.classes = None if classes is None else torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i] if self.classes is None else self.classes[i]
        return {"input_ids": self.ids[i], "labels": labels}


class Truth(TrainerCallback):
    """Per named parameter, keyed by ``state.global_step``: the gradient norm the optimizer
    sees (after HF's clipping) and the norm of the change its step made."""

    def __init__(self):
        self.grads, self.updates, self._before = {}, {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = dict(model.named_parameters())
        self.grads[state.global_step] = {
            n: p.grad.detach().double().norm().item()
            for n, p in named.items()
            if p.grad is not None
        }
        self._before = {n: p.detach().clone() for n, p in named.items()}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.updates[state.global_step] = {
            n: (p.detach() - self._before[n]).double().norm().item()
            for n, p in model.named_parameters()
        }


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def train(tmp_path, callbacks, *, model=None, name="out", data=None, **overrides):
    options = dict(
        seed=0,
        data_seed=0,
        use_cpu=True,
        report_to=[],
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        output_dir=str(tmp_path / name),
    )
    options.update(overrides)
    resume = options.pop("resume_from_checkpoint", None)
    model = gpt2() if model is None else model
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**options),
        train_dataset=data or Tokens(),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_one_record_per_optimizer_step_with_accumulation_and_the_loss_hf_logs(tmp_path):
    cb = VanishingCallback(print_diagnosis=False)
    trainer = train(tmp_path, [cb], gradient_accumulation_steps=3, max_steps=4)
    steps = vanishing.load_run(cb.run_dir).steps
    assert steps["step"].tolist() == [0, 1, 2, 3]
    assert steps["n_backward"].tolist() == [3, 3, 3, 3]
    # HF divides each micro-batch loss for the accumulation (GPT-2 takes num_items_in_batch:
    # by the tokens of the whole accumulated batch) before backward; the recorded loss sums
    # the step's backward losses, which is what HF logs at logging_steps=1
    logged = [h["loss"] for h in step_logs(trainer)]
    assert [h["step"] for h in step_logs(trainer)] == [1, 2, 3, 4]
    assert steps["loss"].tolist() == pytest.approx(logged, rel=1e-6)
    assert 3.5 < logged[0] < 4.7  # about log(64): the mean token loss, not k times it


def test_clipping_records_hf_grad_norm_before_and_the_clipped_norm_after(tmp_path):
    cb = VanishingCallback(print_diagnosis=False)
    trainer = train(tmp_path, [cb], gradient_accumulation_steps=2, max_grad_norm=0.5, max_steps=5)
    steps = vanishing.load_run(cb.run_dir).steps
    hf = [h["grad_norm"] for h in step_logs(trainer)]
    before, after = steps["grad_norm_backward"].tolist(), steps["grad_norm_step"].tolist()
    assert before == pytest.approx(hf, rel=1e-5)  # HF logs the pre-clip norm
    engaged = [b > 0.5 for b in before]
    assert any(engaged)
    for b, a, e in zip(before, after, engaged):
        if e:
            assert a <= 0.5 * (1 + 1e-6)
            assert a == pytest.approx(0.5, rel=1e-5)
        else:
            assert a == pytest.approx(b, rel=1e-6)


def test_per_parameter_gradient_and_update_norms_equal_the_true_ones_each_step(tmp_path):
    cb, truth = VanishingCallback(print_diagnosis=False), Truth()
    train(tmp_path, [cb, truth], gradient_accumulation_steps=2, max_steps=4)
    run = vanishing.load_run(cb.run_dir)
    m = run.metrics
    m = m[m.param != ""]
    names = {f"{r.layer}.{r.param}" for r in m.itertuples()}
    assert names == set(truth.grads[0])  # every parameter once (named_parameters dedupes ties)
    assert sorted(truth.grads) == run.steps["step"].tolist() == [0, 1, 2, 3]
    for r in m.itertuples():
        name = f"{r.layer}.{r.param}"
        assert r.grad_norm == pytest.approx(truth.grads[r.step][name], rel=1e-5), (r.step, name)
        assert r.update_norm == pytest.approx(truth.updates[r.step][name], rel=1e-4), (r.step, name)
        assert truth.updates[r.step][name] > 0  # the hooks are on the optimizer that steps


def test_tied_embedding_and_lm_head_weight_is_listed_once(tmp_path):
    cb = VanishingCallback(print_diagnosis=False)
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    train(tmp_path, [cb], model=model, max_steps=2)
    run = vanishing.load_run(cb.run_dir)
    layers = {layer["name"]: layer for layer in run.manifest["layers"]}
    (wte,) = layers["transformer.wte"]["params"]
    assert wte["name"] == "weight" and wte["shared_with"] == ["lm_head.weight"]
    assert layers["lm_head"]["params"] == []
    m = run.metrics
    weights = m[(m.param == "weight") & m.layer.isin(["transformer.wte", "lm_head"])]
    assert weights.layer.unique().tolist() == ["transformer.wte"]
    assert len(weights) == 2  # one row per step


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    plain = train(tmp_path, [], name="plain", gradient_accumulation_steps=2, max_steps=6)
    cb = VanishingCallback(print_diagnosis=False)
    watched = train(tmp_path, [cb], name="watched", gradient_accumulation_steps=2, max_steps=6)
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [h[key] for h in step_logs(watched)] == [h[key] for h in step_logs(plain)]
    a, b = plain.model.state_dict(), watched.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_k_records_what_every_step_records_at_those_steps(tmp_path):
    """every=2 with accumulation: the hooks inside GPT-2 are detached between recorded steps;
    steps 0, 2, 4 hold what every=1 records there (activations, error signals included)."""
    runs = {}
    for every in (1, 2):
        cb = VanishingCallback(tmp_path / f"every{every}", every=every, print_diagnosis=False)
        train(tmp_path, [cb], name=f"e{every}", gradient_accumulation_steps=2, max_steps=5)
        runs[every] = vanishing.load_run(cb.run_dir)
    assert_thinned_run_equals(runs[1], runs[2], [0, 2, 4])


def test_default_run_dir_diagnosis_printed_once_and_monitor_closed(tmp_path, capsys):
    cb = VanishingCallback()
    trainer = train(tmp_path, [cb], max_steps=3)
    assert cb.run_dir == tmp_path / "out" / "vanishing"
    assert isinstance(cb.diagnosis, vanishing.Diagnosis)
    out = capsys.readouterr().out
    assert out.count(f"vanishing: run {cb.run_dir}") == 1
    assert str(cb.diagnosis) in out
    assert cb.monitor is None and not hasattr(trainer.model, "_vanishing_monitor")
    manifest = json.loads((cb.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["optimizer"]["type"] == "AdamW"
    assert vanishing.load_run(cb.run_dir).diagnose().to_dict() == cb.diagnosis.to_dict()


def test_summary_scalars_go_into_hf_logs(tmp_path):
    cb = VanishingCallback(print_diagnosis=False)
    trainer = train(tmp_path, [cb], max_steps=3)
    steps = vanishing.load_run(cb.run_dir).steps
    logs = step_logs(trainer)
    assert len(logs) == 3
    for i, h in enumerate(logs):
        tags = {k for k in h if k.startswith("vanishing/")}
        assert "vanishing/loss" not in tags  # HF logs the loss itself
        assert {"vanishing/first_last_ratio", "vanishing/grad_norm_step"} <= tags
        assert len(tags) <= 6
        assert (
            math.isfinite(h["vanishing/first_last_ratio"]) and h["vanishing/first_last_ratio"] > 0
        )
        assert h["vanishing/grad_norm_step"] == pytest.approx(steps["grad_norm_step"][i])
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final and not any(k.startswith("vanishing/") for k in final)

    quiet = VanishingCallback(print_diagnosis=False, log_scalars=False)
    trainer = train(tmp_path, [quiet], name="quiet", max_steps=2)
    assert not any(k.startswith("vanishing/") for h in trainer.state.log_history for k in h)


def test_an_existing_run_is_a_warning_not_an_error_and_overwrite_replaces_it(tmp_path):
    run_dir = tmp_path / "run"
    train(tmp_path, [VanishingCallback(run_dir, print_diagnosis=False)], max_steps=2)
    cb = VanishingCallback(run_dir, print_diagnosis=False)
    with pytest.warns(RuntimeWarning, match=r"VanishingCallback\(overwrite=True\)"):
        trainer = train(tmp_path, [cb], max_steps=3)
    assert trainer.state.global_step == 3 and cb.diagnosis is None
    assert vanishing.load_run(run_dir).steps["step"].tolist() == [0, 1]

    cb = VanishingCallback(run_dir, overwrite=True, print_diagnosis=False)
    train(tmp_path, [cb], max_steps=3)
    assert vanishing.load_run(run_dir).steps["step"].tolist() == [0, 1, 2]


def test_a_failure_inside_the_callback_is_a_warning_and_training_goes_on(tmp_path, monkeypatch):
    plain = train(tmp_path, [], name="plain", max_steps=3)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(vanishing, "watch", broken)
    cb = VanishingCallback(print_diagnosis=False)
    with pytest.warns(RuntimeWarning, match="on_train_begin failed: RuntimeError: boom"):
        trainer = train(tmp_path, [cb], max_steps=3)
    assert [h["loss"] for h in step_logs(trainer)] == [h["loss"] for h in step_logs(plain)]
    assert cb.monitor is None and cb.diagnosis is None


def test_resuming_from_a_checkpoint_continues_the_run(tmp_path):
    run_dir = tmp_path / "run"
    options = dict(name="ckpt", save_strategy="steps", save_steps=3, save_only_model=False)
    train(tmp_path, [VanishingCallback(run_dir, print_diagnosis=False)], max_steps=3, **options)
    cb = VanishingCallback(run_dir, print_diagnosis=False)
    train(tmp_path, [cb], max_steps=5, resume_from_checkpoint=True, **options)
    run = vanishing.load_run(run_dir)
    assert run.steps["step"].tolist() == [0, 1, 2, 3, 4]
    assert run.manifest["resumed_at"] == [3]


def test_bert_sequence_classification_smoke(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    cb = VanishingCallback(print_diagnosis=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no warning from the callback
        train(tmp_path, [cb], model=model, data=Tokens(classes=2), max_steps=3, max_grad_norm=0.0)
    run = vanishing.load_run(cb.run_dir)
    assert run.steps["step"].tolist() == [0, 1, 2]
    assert "bert.encoder.layer.1.attention.self.query" in run.layers
    assert "grad_norm_backward" not in run.steps or run.steps["grad_norm_backward"].isna().all()
    assert str(cb.diagnosis)
    assert run.diagnose().to_dict() == cb.diagnosis.to_dict()


def test_accelerate_wrapper_with_a_grad_scaler_records_unscaled_values(tmp_path):
    # fp16 needs a GPU in the Trainer; here accelerate's wrapper is driven as the Trainer does
    # (scaled backward, unscale and clip, wrapper.step, zero_grad), with a CPU GradScaler
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerControl, TrainerState

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    accelerator = accelerate.Accelerator(cpu=True)  # the state the wrapper reads (after args)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = AcceleratedOptimizer(inner, scaler=scaler)
    assert accelerator.state.distributed_type is not None
    state, control = TrainerState(), TrainerControl()
    cb = VanishingCallback(print_diagnosis=False, log_scalars=False)
    cb.on_train_begin(args, state, control, model=model, optimizer=wrapper)
    losses, clipped_from, grads = [], [], []
    for i in range(4):
        loss = (10 * model(torch.randn(16, 4))).pow(2).mean()
        if i == 2:
            loss = loss * float("inf")  # the scaler skips this step
        scaler.scale(loss).backward()
        scaler.unscale_(inner)
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if i != 2:
            losses.append(loss.item())
            clipped_from.append(total.item())
            grads.append([p.grad.norm().item() for p in model.parameters()])
        wrapper.step()
        model.zero_grad()
        state.global_step += 1
    cb.on_train_end(args, state, control)
    run = vanishing.load_run(cb.run_dir)
    assert run.manifest["amp_scaler"] is True
    steps = run.steps
    assert steps["step"].tolist() == [0, 1, 2]
    assert steps["skipped"].tolist() == [0, 0, 1]
    assert steps["loss"].tolist() == pytest.approx(losses, rel=1e-5)
    assert steps["grad_norm_backward"].tolist() == pytest.approx(clipped_from, rel=1e-5)
    assert (steps["grad_norm_step"] <= 1.0 + 1e-6).all()
    m = run.metrics
    m = m[m.param != ""]
    for step, expected in enumerate(grads):
        got = m[m.step == step].sort_values("depth")["grad_norm"].tolist()
        assert got == pytest.approx(expected, rel=1e-5)
        assert (m[m.step == step]["update_norm"] > 0).all()


def _check_activation_statistics(model, name, phi, loss_of, tmp_path):
    """Two watched AdamW steps; the activation module ``name``'s recorded statistics at step 1
    against its hooked input and output and autograd's derivative of ``phi``; the run."""
    seen = {}
    model.get_submodule(name).register_forward_hook(
        lambda m, a, out: seen.update(z=a[0].detach(), y=out.detach())
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        for _ in range(2):
            loss = loss_of()
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = vanishing.load_run(tmp_path / "r")
    m = run.metrics
    row = m[(m["step"] == 1) & (m["layer"] == name) & (m["param"] == "")].iloc[0]
    z, y = seen["z"].double(), seen["y"].double()
    zg = z.clone().requires_grad_(True)
    (dphi,) = torch.autograd.grad(phi(zg).sum(), zg)
    assert row["act_mean"] == pytest.approx(float(y.mean()), rel=1e-5)
    assert row["act_deriv_mean"] == pytest.approx(float(dphi.mean()), rel=1e-5)
    return run


def test_llama_silu_activations_are_measured(tmp_path):
    # transformers' ACT2FN["silu"] is its own SiLUActivation class (F.silu): the MLPs of Llama,
    # Mistral and Qwen; their activation statistics equal the hooked outputs' own, by hand
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    name = "model.layers.1.mlp.act_fn"
    assert type(model.get_submodule(name)).__name__ == "SiLUActivation"
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    run = _check_activation_statistics(
        model, name, torch.nn.functional.silu, lambda: model(input_ids=ids, labels=ids).loss,
        tmp_path,
    )  # fmt: skip
    assert not any("SiLUActivation" in n for n in run.diagnose(model).notes)
    # its LlamaRMSNorm modules are normalisation layers, not hidden layers of the depth profile
    from vanishing.recorder.semantics import hidden_layers, is_normalization

    norms = [x["name"] for x in run.layer_info if is_normalization(x["type"])]
    assert norms == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
        "model.norm",
    ]  # fmt: skip
    assert not set(norms) & set(hidden_layers(run.layer_info))


def test_hugging_face_blocks_are_skip_connections_for_the_diagnosis_and_repair(tmp_path):
    # every HF block derives from GradientCheckpointingLayer and computes x + f(x); plain
    # torch.fx cannot trace these models, so the class is what tells
    from vanishing.modules import skip_connections
    from vanishing.repair.transforms import NotApplicable, apply_remedy

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    )
    assert skip_connections(model) is True
    ids = torch.randint(0, 32, (2, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    assert vanishing.load_run(tmp_path / "r").manifest["skip_connections"] is True
    with pytest.raises(
        NotApplicable, match=r"already has residual structure \(GPT2Block at transformer.h.0\)"
    ):
        apply_remedy(model, "residual", example_inputs={"input_ids": ids})


def test_a_transformers_first_last_ratio_compares_each_role_with_itself(tmp_path):
    """A GPT-2's first hidden layer is block 0's attention and its last the last block's MLP
    output: their bias gradients differ by role (the ratio read ~0.06 on a healthy model).
    The ratio now divides each role of block 0 by the same role of the last block, median over
    roles per step, median over steps; the oracle is the loop's own bias gradients, and the
    logger tag is that per-step curve."""
    import numpy as np

    from vanishing.sinks.scalars import ScalarSelector

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=4, n_head=2)
    )
    roles = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    tags = []

    class Tags:  # a sink: the scalars a logger gets
        def open(self, manifest):
            selector.observe_manifest(manifest)

        def write(self, block):
            tags.extend(v.get("vanishing/first_last_ratio") for _, v in selector.scalars(block))

        def close(self):
            pass

    selector = ScalarSelector()
    with vanishing.watch(model, opt, run_dir=tmp_path / "r", sinks=[Tags()]):
        for _ in range(5):
            ids = torch.randint(0, 32, (4, 12))
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            named = dict(model.named_parameters())
            g = {
                (b, r): named[f"transformer.h.{b}.{r}.bias"].grad.double().norm().item()
                for b in (0, 3)
                for r in roles
            }
            seen.append(float(np.median([g[(0, r)] / g[(3, r)] for r in roles])))
            opt.step()
    run = vanishing.load_run(tmp_path / "r")
    assert run.first_last_ratio() == pytest.approx(float(np.median(seen)), rel=1e-5)
    assert 0.3 < run.first_last_ratio() < 3  # healthy at init: each role learns alike
    assert tags == pytest.approx(seen, rel=1e-5)
    assert run.step_ratios().tolist() == pytest.approx(seen, rel=1e-5)
    # the report says what the number compares
    from vanishing.report.formatting import RATIO_LABEL_BY_ROLE
    from vanishing.report.html import write_report

    page = write_report(tmp_path / "r").read_text()
    assert f"<th>{RATIO_LABEL_BY_ROLE}</th><td>{run.first_last_ratio():.3g}</td>" in page
    # so does the terminal, whose last-step row is that step's ratio over the 4 roles (the
    # raw speeds of block 0's attention and the last MLP are not comparable)
    from rich.console import Console

    from vanishing.report.terminal import run_table

    console = Console(width=200, record=True)
    console.print(run_table(run))
    text = console.export_text()
    assert f"first / last block, median over 4 roles {seen[-1]:.3g}" in text
    row = next(line for line in text.splitlines() if RATIO_LABEL_BY_ROLE in line)
    assert row.split("│")[-2].strip() == f"{run.first_last_ratio():.3g}"
    # and `compare`'s caption
    from vanishing.report.terminal import compare_table

    assert "role by role" in compare_table([run], ["gpt2"]).caption


def test_clip_quick_gelu_activations_are_measured(tmp_path):
    # CLIP's MLPs use transformers' QuickGELUActivation, x * sigmoid(1.702 x) (was listed
    # unmeasured); its statistics equal the hooked outputs' own and autograd's derivative
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )  # fmt: skip
    model = CLIPTextModel(cfg)
    # (the module path moved between transformers versions: found by its tail)
    name, act = next(
        (n, m) for n, m in model.named_modules() if n.endswith("layers.1.mlp.activation_fn")
    )
    assert type(act).__name__ == "QuickGELUActivation"
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    run = _check_activation_statistics(
        model, name, lambda z: z * torch.sigmoid(1.702 * z),
        lambda: model(input_ids=ids).pooler_output.pow(2).mean(), tmp_path,
    )  # fmt: skip
    assert {x["name"]: x for x in run.layer_info}[name]["activation"] == "quick_gelu"
    assert not any("QuickGELUActivation" in n for n in run.diagnose(model).notes)


def _gpt2_small():
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=4, n_head=4)
    ), lambda ids: {"input_ids": ids, "labels": ids}


def _bart_small():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=64, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    return BartForConditionalGeneration(config), lambda ids: {
        "input_ids": ids.clamp(min=3),
        "labels": ids.clamp(min=3),
    }


def _electra_small():
    from transformers import ElectraConfig, ElectraForSequenceClassification

    config = ElectraConfig(
        vocab_size=64, embedding_size=32, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return ElectraForSequenceClassification(config), lambda ids: {
        "input_ids": ids,
        "labels": ids[:, 0] % 3,
    }


def _deberta_small():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, relative_attention=True,
        position_buckets=16, pos_att_type=["p2c", "c2p"], num_labels=3,
    )  # fmt: skip
    return DebertaV2ForSequenceClassification(config), lambda ids: {
        "input_ids": ids,
        "labels": ids[:, 0] % 3,
    }


def _convbert_small():
    from transformers import ConvBertConfig, ConvBertForSequenceClassification

    config = ConvBertConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, embedding_size=64, head_ratio=2, conv_kernel_size=9,
        num_groups=1, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return ConvBertForSequenceClassification(config), lambda ids: {
        "input_ids": ids,
        "labels": ids[:, 0] % 3,
    }


def _mamba_small():
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=64, hidden_size=64, state_size=8, num_hidden_layers=4, conv_kernel=4,
        expand=2, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return MambaForCausalLM(config), lambda ids: {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize(
    "build, slow",
    [
        (_gpt2_small, (".ln_",)),  # LayerNorm gains
        (_bart_small, (".q_proj.", ".k_proj.")),  # attention scores' projections
        (_electra_small, (".query.", ".key.")),
        # the relative-position query and key: they enter only the scores (c2p, p2c)
        (_deberta_small, ("_proj.",)),
        # the span-based dynamic convolution: its kernel is a softmax of a product
        (_convbert_small, (".query.", ".key.", "conv_attn_layer.", "conv_kernel_layer.")),
        # the selective scan's step size, softplus(dt_proj(x) + b) with b set for 1e-3..1e-1
        (_mamba_small, (".dt_proj.",)),
    ],
    ids=[
        "gpt2-layernorm",
        "bart-query-key",
        "electra-query-key",
        "deberta-position-query-key",
        "convbert-span-kernel",
        "mamba-step-size",
    ],  # fmt: skip
)
def test_what_a_healthy_transformer_moves_slowly_under_sgd_is_not_stalled_layers(
    tmp_path, build, slow
):
    """Under SGD at init some weights move ~1e-4 as fast as a transformer's other matrices, in
    every block alike: a LayerNorm's gain (started at one, norm sqrt(width): it moves
    lr * |grad| / sqrt(width)), an attention's query and key projections (each one's gradient
    is proportional to the other's weight, and the scores start near zero), and the roles
    whose output reaches the loss the same way, through another layer's small weights or a
    saturating step size (DeBERTa's relative-position projections, ConvBERT's span kernel,
    Mamba's dt_proj). Measured from the loop's own weights below, they cross the stalled
    rule's line (1/1000 of the 90th percentile); none is a gradient lost through depth (the
    last block's move as slowly), and the diagnosis said 'stalled_layers ... he_init'."""
    import numpy as np

    torch.manual_seed(0)
    model, batch = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    rates = {}
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        for _ in range(5):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            model(**batch(ids)).loss.backward()
            opt.step()
            for n, p in model.named_parameters():
                if n.endswith(".weight") and p.dim() >= 1:
                    d = (p.detach() - before[n]).double().norm() / before[n].double().norm()
                    rates.setdefault(n, []).append(float(d))
    med = {n: float(np.median(v)) for n, v in rates.items() if "embed" not in n}
    line = 1e-3 * float(np.quantile(list(med.values()), 0.9))  # the rule's line
    below = [n for n, v in med.items() if v < line]
    assert len(below) >= 2, (line, sorted(med.items(), key=lambda x: x[1])[:6])
    assert all(any(k in n for k in slow) for n in below), below  # only those kinds cross
    diagnosis = vanishing.load_run(tmp_path / "r").diagnose(model=model)
    assert diagnosis.healthy, str(diagnosis)


def test_a_role_held_back_by_its_learning_rate_in_every_block_is_still_stalled(tmp_path):
    """The other side of the line above: ELECTRA's FFN input matrices in a parameter group at
    lr 1e-7 (the rest at 0.1) stall in every block alike too, but their gradient is a normal
    one (measured from the loop: the step size holds them back), so they are stalled_layers,
    with the learning rate as the remedy."""
    import numpy as np

    torch.manual_seed(0)
    model, batch = _electra_small()
    slow = [p for n, p in model.named_parameters() if ".intermediate.dense." in n]
    rest = [p for n, p in model.named_parameters() if ".intermediate.dense." not in n]
    opt = torch.optim.SGD([{"params": rest, "lr": 0.1}, {"params": slow, "lr": 1e-7}])
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    grads = {}
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        for _ in range(5):
            opt.zero_grad()
            model(**batch(ids)).loss.backward()
            for n, p in model.named_parameters():
                if n.endswith(".weight") and "embed" not in n and "LayerNorm" not in n:
                    grads.setdefault(n, []).append(float(p.grad.norm() / p.detach().norm()))
            opt.step()
    med = {n: float(np.median(v)) for n, v in grads.items()}
    typical = float(np.quantile(list(med.values()), 0.9))
    held = {n: v / typical for n, v in med.items() if ".intermediate.dense." in n}
    assert len(held) == 4 and min(held.values()) > 1e-2, held  # a normal gradient
    diagnosis = vanishing.load_run(tmp_path / "r").diagnose(model=model)
    (finding,) = [f for f in diagnosis.findings if f.kind == "stalled_layers"]
    assert sorted(finding.layers) == sorted(n.rsplit(".", 1)[0] for n in held)
    assert finding.remedies[0].name == "higher_learning_rate"


def test_a_layer_whose_output_never_reaches_the_loss_is_unused_not_stalled(tmp_path):
    """A stock Longformer classifier reads only the CLS token, a global one, which the last
    layer computes with its ``*_global`` projections: that layer's local value projection gets
    an exactly zero gradient at every step (the loop's own gradients say so). It is unused, not
    stalled (it was a critical stalled_layers finding); the diagnosis says it in a note."""
    from transformers import LongformerConfig, LongformerForSequenceClassification

    torch.manual_seed(0)
    config = LongformerConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=70, attention_window=8, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, sep_token_id=2, num_labels=3,
    )  # fmt: skip
    model = LongformerForSequenceClassification(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    unused = "longformer.encoder.layer.3.attention.self.value"
    zero = []
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        for _ in range(5):
            ids = torch.randint(3, 64, (4, 32), generator=gen)
            opt.zero_grad()
            model(input_ids=ids, labels=ids[:, 1] % 3).loss.backward()
            grad = dict(model.named_parameters())[f"{unused}.weight"].grad
            zero.append(grad is not None and not grad.any())
            opt.step()
    assert all(zero)
    diagnosis = vanishing.load_run(tmp_path / "r").diagnose(model=model)
    assert "stalled_layers" not in diagnosis.kinds, str(diagnosis)
    assert any("received no gradient" in n and unused in n for n in diagnosis.notes)


def test_attention_score_projections_are_found_in_real_models_by_their_names():
    """Every separate query and key projection of real models (BART's encoder, decoder and
    cross attention; ELECTRA; Llama; T5's q/k/v; DistilBERT's q_lin), and nothing else: the
    oracle is the model's own attention modules, counted by class."""
    from transformers import (
        DistilBertConfig,
        DistilBertModel,
        LlamaConfig,
        LlamaModel,
        T5Config,
        T5Model,
    )

    from vanishing.recorder.semantics import attention_score_projections

    models = {
        "bart": (_bart_small()[0], "Attention", ("q_proj", "k_proj")),
        "electra": (_electra_small()[0], "SelfAttention", ("query", "key")),
        "llama": (
            LlamaModel(
                LlamaConfig(
                    vocab_size=32,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                )
            ),
            "Attention",
            ("q_proj", "k_proj"),
        ),  # fmt: skip
        "t5": (
            T5Model(
                T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
            ),
            "T5Attention",
            ("q", "k"),
        ),  # fmt: skip
        "distilbert": (
            DistilBertModel(
                DistilBertConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
            ),
            "Attention",
            ("q_lin", "k_lin"),
        ),  # fmt: skip
        "gpt2": (gpt2(), "Attention", ()),  # fused c_attn: carries the values, not one
    }
    for label, (model, cls, children) in models.items():
        names = [n for n, _ in model.named_modules() if n]
        attention = [n for n, m in model.named_modules() if type(m).__name__.endswith(cls)]
        expected = {f"{a}.{c}" for a in attention for c in children}
        assert attention_score_projections(names) == expected, label
        assert expected or label == "gpt2"


def test_a_gradient_that_mirrors_shrinking_activations_before_a_final_norm_is_not_vanishing():
    """A stock PoolFormer at init: its layer-scale gains (1e-5) make each block nearly the
    identity, so the trunk is a chain of four small-gain downsampling convs, then a GroupNorm
    before the classifier. Measured with autograd: the error signal at the first stage is
    ~1/70 of the last's (the vanishing rule's line is 1/10), but each conv's weight gradient
    relative to its weight is larger at the first stage than at the last: the activations
    shrink forward as the error signal shrinks back, and the final norm makes their scale
    irrelevant. `inspect` said vanishing_gradient (warning) for it; now it is a note. The
    controls: a stock EfficientNet, whose blocks' weight gradients underflow to zero at init
    (its BatchNorm gains start at ~0.02), and a deep sigmoid chain with the same final norm
    (its relative weight gradients shrink too) still vanish."""
    from transformers import PoolFormerConfig, PoolFormerForImageClassification

    from helpers import retain_outputs

    torch.manual_seed(0)
    model = PoolFormerForImageClassification(
        PoolFormerConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=3)
    )
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    stages = [f"poolformer.encoder.patch_embeddings.{i}.projection" for i in range(4)]
    outputs, handles = retain_outputs(model, stages)
    model(pixel_values=x, labels=y).loss.backward()
    for h in handles:
        h.remove()
    rms = [outputs[n].grad.double().pow(2).mean().sqrt().item() for n in stages]
    rel = [
        (model.get_submodule(n).weight.grad.norm() / model.get_submodule(n).weight.norm()).item()
        for n in stages
    ]
    model.zero_grad()
    assert rms[0] / rms[-1] < 0.1 and rel[0] / rel[-1] > 1.0, (rms, rel)
    diagnosis = vanishing.inspect(
        model, {"pixel_values": x, "labels": y}, None, lambda o, t: o.loss
    )
    assert "vanishing_gradient" not in diagnosis.kinds, str(diagnosis)
    assert any("no vanishing gradient" in n and "'norm'" in n for n in diagnosis.notes)

    # a stock EfficientNet (transformers draws its BatchNorm gains from N(0, 0.02)) with its
    # BatchNorm before the head: at init every block's conv weights get a gradient below
    # 1e-20 of their norm (or an underflowed 0), so nothing says the first blocks learn
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    torch.manual_seed(0)
    config = EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320, num_labels=3
    )
    net = EfficientNetForImageClassification(config)
    net(pixel_values=x, labels=y).loss.backward()
    convs = [p for n, p in net.named_parameters() if ".blocks." in n and p.dim() == 4]
    rates = [float(p.grad.norm() / p.detach().norm()) for p in convs]
    assert convs and max(rates) < 1e-20, max(rates)  # nothing in the blocks learns
    net.zero_grad()
    diagnosis = vanishing.inspect(net, {"pixel_values": x, "labels": y}, None, lambda o, t: o.loss)
    assert "vanishing_gradient" in diagnosis.kinds, str(diagnosis)
    # its blocks end with a BatchNorm on the branch, not a layer norm of the sum: no post-LN
    # remedies; the convs' activation is the SiLU after their BatchNorm, and He init of the
    # convs alone (the remedy named) takes the finding away
    finding = next(f for f in diagnosis.findings if f.kind == "vanishing_gradient")
    names = [r.name for r in finding.remedies]
    assert "pre_layer_norm" not in names and "learning_rate_warmup" not in names, names
    assert "he_init" in names and "silu" in finding.cause, finding.cause
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    diagnosis = vanishing.inspect(net, {"pixel_values": x, "labels": y}, None, lambda o, t: o.loss)
    assert "vanishing_gradient" not in diagnosis.kinds, str(diagnosis)

    layers = []
    for _ in range(10):
        layers += [torch.nn.Linear(32, 32), torch.nn.Sigmoid()]
    chain = torch.nn.Sequential(*layers, torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    diagnosis = vanishing.inspect(
        chain, torch.randn(64, 32), torch.randint(0, 4, (64,)), torch.nn.functional.cross_entropy
    )
    assert "vanishing_gradient" in diagnosis.kinds, str(diagnosis)


def test_layers_behind_a_small_layer_scale_are_not_stalled_layers(tmp_path):
    """A stock ConvNeXt multiplies each block's branch by a layer scale started at 1e-6, so
    under SGD every conv inside a block gets its gradient scaled by 1e-6 and, measured from the
    loop's own weights, moves less than 1/1000 as fast as the layers that learn (it was a
    critical stalled_layers finding with he_init advised). The gain is a design choice that
    grows as it learns: the diagnosis names it in a note instead."""
    import numpy as np
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    config = ConvNextConfig(
        num_channels=3, hidden_sizes=[16, 32], depths=[2, 2], num_labels=3, image_size=32,
        num_stages=2,
    )  # fmt: skip
    model = ConvNextForImageClassification(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    rates = {}
    with vanishing.watch(model, opt, run_dir=tmp_path / "r"):
        for _ in range(6):
            x = torch.randn(8, 3, 32, 32, generator=gen)
            y = torch.randint(0, 3, (8,), generator=gen)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            model(pixel_values=x, labels=y).loss.backward()
            opt.step()
            for n, p in model.named_parameters():
                if n.endswith(".weight") and p.dim() >= 2:
                    d = (p.detach() - before[n]).double().norm() / before[n].double().norm()
                    rates.setdefault(n, []).append(float(d))
    med = {n: float(np.median(v)) for n, v in rates.items()}
    line = 1e-3 * float(np.quantile(list(med.values()), 0.9))  # the rule's line
    below = sorted(n for n, v in med.items() if v < line)
    assert len(below) >= 6 and all(".layers." in n for n in below), below
    gains = [p for n, p in model.named_parameters() if n.endswith("layer_scale_parameter")]
    assert gains and all(float(g.detach().abs().max()) < 1e-3 for g in gains)
    diagnosis = vanishing.load_run(tmp_path / "r").diagnose(model=model)
    assert "stalled_layers" not in diagnosis.kinds, str(diagnosis)
    assert any("layer_scale_parameter" in n and "small gain" in n for n in diagnosis.notes)
