"""False alarms on trained real architectures: train each a few hundred steps, diagnose, print.

Each model is a healthy design people train today, written as its authors do (Hugging Face
models from small configs with random weights; nanoGPT, ResNet, VGG-BN, MobileNet-style, ViT,
post-LN Transformer, LSTM/GRU language models, MLPs), trained on a learnable task (a shifted
token sequence; scikit-learn's digits) until its loss falls, then diagnosed by ``mon.diagnose()``.
A finding on a run whose loss fell 10-1000x is a false alarm to look at. Nothing is downloaded.

    python bench/diagnosis_zoo.py                        # every model, 300 steps, AdamW/SGD+momentum
    python bench/diagnosis_zoo.py --models resnet,vit --steps 400 --lr 0.1 --no-clip
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

V, T = 64, 32  # vocabulary and sequence length of the token task


def token_batch(g: torch.Generator, n: int = 16):
    """Sequences ``start + k * offset (mod V)``: the next token follows from the last two."""
    start = torch.randint(0, V, (n, 1), generator=g)
    off = torch.randint(1, 4, (n, 1), generator=g)
    seq = (start + off * torch.arange(T + 1)) % V
    return seq[:, :-1], seq[:, 1:]


class HF(nn.Module):
    """A Hugging Face causal or masked LM from a small config, returning logits."""

    def __init__(self, kind: str):
        super().__init__()
        import transformers as tf

        small = dict(vocab_size=V, max_position_embeddings=T, num_attention_heads=4)
        if kind == "gpt2":
            cfg = tf.GPT2Config(vocab_size=V, n_positions=T, n_embd=64, n_layer=4, n_head=4)
            self.m = tf.GPT2LMHeadModel(cfg)
        elif kind == "llama":
            cfg = tf.LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_key_value_heads=2,
                **small,
            )
            self.m = tf.LlamaForCausalLM(cfg)
        elif kind == "bert":
            cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=4, intermediate_size=128, **small)
            self.m = tf.BertForMaskedLM(cfg)
        else:
            cfg = tf.GPTNeoXConfig(
                hidden_size=64, num_hidden_layers=4, intermediate_size=128, **small
            )
            self.m = tf.GPTNeoXForCausalLM(cfg)

    def forward(self, x):
        return self.m(input_ids=x).logits


class NanoBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    """Karpathy's nanoGPT: pre-LN blocks, GELU MLP, tied input/output embedding, its init."""

    def __init__(self, d=64, layers=6, heads=4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList([NanoBlock(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():  # nanoGPT's _init_weights: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        z = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
        for b in self.blocks:
            z = b(z)
        return self.head(self.ln(z))


class PostLN(nn.Module):
    """``nn.TransformerEncoder`` of post-LN layers (the 2017 layout), causal."""

    def __init__(self, d=64, layers=6):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, V)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.out(self.enc(self.emb(x), mask=mask, is_causal=True))


class RecurrentLM(nn.Module):
    def __init__(self, cell=nn.LSTM, d=64, layers=2):
        super().__init__()
        self.emb, self.rnn, self.out = (
            nn.Embedding(V, d),
            cell(d, d, layers, batch_first=True),
            nn.Linear(d, V),
        )

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0])


class Basic(nn.Module):
    """ResNet's basic block: conv-BN-ReLU-conv-BN plus the (projected) input, then ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.sc = nn.Sequential()
        if stride != 1 or cin != cout:
            self.sc = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.sc(x))


class ResNet(nn.Module):
    def __init__(self, w=16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        widths = [
            (w, w, 1),
            (w, w, 1),
            (w, 2 * w, 2),
            (2 * w, 2 * w, 1),
            (2 * w, 4 * w, 2),
            (4 * w, 4 * w, 1),
        ]
        self.layers = nn.Sequential(*[Basic(*a) for a in widths])
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def conv_chain(widths, norm=True, he=False):
    """3x3 convs (BatchNorm after each when ``norm``), ReLU; "M" in ``widths``: a 2x2 max-pool."""
    layers, c = [], 1
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        conv = nn.Conv2d(c, w, 3, padding=1)
        if he:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        layers += [conv] + ([nn.BatchNorm2d(w)] if norm else []) + [nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class MobileBlock(nn.Module):
    """Depthwise then pointwise conv, each with BN and ReLU6, plus the input."""

    def __init__(self, c):
        super().__init__()
        self.dw, self.b1 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.pw, self.b2 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + F.relu6(self.b2(self.pw(F.relu6(self.b1(self.dw(x))))))


def mobile(c=32, blocks=6):
    stem = [nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6()]
    body = [MobileBlock(c) for _ in range(blocks)]
    return nn.Sequential(*stem, *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class ViT(nn.Module):
    """2x2 patches of the 8x8 digits, a class token, pre-LN encoder layers."""

    def __init__(self, d=64, layers=4):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 2, 2)
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        layer = nn.TransformerEncoderLayer(
            d, 4, 128, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):
        z = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        z = torch.cat([self.cls.expand(len(z), -1, -1), z], 1)
        return self.fc(self.ln(self.enc(z))[:, 0])


def mlp(depth=12, act=nn.GELU, norm=True):
    layers, d = [nn.Flatten()], 64
    for _ in range(depth):
        layers += [nn.Linear(d, 128)] + ([nn.LayerNorm(128)] if norm else []) + [act()]
        d = 128
    return nn.Sequential(*layers, nn.Linear(128, 10))


#: name: (builder, task, optimizer)
MODELS = {
    "gpt2": (lambda: HF("gpt2"), "tokens", "adamw"),
    "llama": (lambda: HF("llama"), "tokens", "adamw"),
    "bert": (lambda: HF("bert"), "tokens", "adamw"),
    "gptneox": (lambda: HF("gptneox"), "tokens", "adamw"),
    "nanogpt": (NanoGPT, "tokens", "adamw"),
    "postln": (PostLN, "tokens", "adamw"),
    "lstm": (RecurrentLM, "tokens", "adam"),
    "gru": (lambda: RecurrentLM(nn.GRU), "tokens", "adam"),
    "resnet": (ResNet, "digits", "sgdm"),
    "vgg_bn": (lambda: conv_chain((16, 16, 32, 32, 64, 64)), "digits", "sgdm"),
    "vgg_bn_pool": (lambda: conv_chain((16, 16, "M", 32, 32, "M", 64, 64)), "digits", "sgdm"),
    "vgg_pool": (
        lambda: conv_chain((16, 16, "M", 32, 32, "M", 64, 64), False, True),
        "digits",
        "sgdm",
    ),
    "mobilenet": (mobile, "digits", "sgdm"),
    "vit": (ViT, "digits", "adamw"),
    "mlp_ln_gelu": (mlp, "digits", "adamw"),
}
DEFAULT_LR = {"adamw": 1e-3, "adam": 3e-3, "sgdm": 0.05}


def run(name: str, steps: int, lr: float | None, clip: bool) -> tuple[float, float, list]:
    import vanishing

    build, task, opt_name = MODELS[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build()
    rate = lr or DEFAULT_LR[opt_name]
    if opt_name == "sgdm":
        opt = torch.optim.SGD(model.parameters(), lr=rate, momentum=0.9)
    elif opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=rate)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=rate, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    if task == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        xs = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        ys = torch.tensor(d.target)
    losses = []
    with tempfile.TemporaryDirectory() as out:
        with vanishing.watch(model, optimizer=opt, run_dir=out, every=max(1, steps // 60)) as mon:
            for _ in range(steps):
                if task == "tokens":
                    x, y = token_batch(g)
                    loss = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
                else:
                    idx = torch.randint(0, len(xs), (64,), generator=g)
                    loss = F.cross_entropy(model(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                if clip:
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                warmup.step()
                losses.append(float(loss.detach()))
            diagnosis = mon.diagnose()
    k = max(1, steps // 30)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k, diagnosis.findings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="all", help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, help="one learning rate for every model")
    p.add_argument("--no-clip", action="store_true", help="no gradient-norm clipping at 1")
    args = p.parse_args(argv)
    names = list(MODELS) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    warnings.simplefilter("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # the Hugging Face models then fail alone, with the reason
        pass
    torch.set_num_threads(1)
    print("| model | loss first -> last | findings |\n| --- | --- | --- |")
    for name in names:
        start = time.perf_counter()
        try:
            first, last, findings = run(name, args.steps, args.lr, not args.no_clip)
        except Exception as e:  # noqa: BLE001 - one model failing (a missing extra) is a row
            print(f"| {name} | - | could not run: {type(e).__name__}: {e} |", flush=True)
            continue
        found = "; ".join(f"{f.kind} ({f.severity}): {f.message}" for f in findings) or "none"
        print(
            f"| {name} | {first:.3g} -> {last:.3g} | {found} |  <!-- {time.perf_counter() - start:.0f} s -->",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
