"""Shared fixtures: small random timm models saved as local checkpoints, the shared real data."""

from __future__ import annotations

import functools
import os
import copy
import dataclasses
from pathlib import Path

# Tests never reach a model hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import Tensor  # noqa: E402

from corp_cli import engine  # noqa: E402
from corp_cli.pruning import group_size, kv_heads_of, o_kept_dims, rotary_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IN1K_CKPT = SHARED_DATA / "deit_tiny_patch16_224.in1k.safetensors"
CIFAR_CKPT = SHARED_DATA / "deit_tiny_patch16_224.cifar10.safetensors"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample"
CIFAR_DIR = SHARED_DATA / "cifar10"

needs_shared_data = pytest.mark.skipif(
    not IN1K_CKPT.is_file() or not IMAGENET_SAMPLE.is_dir(),
    reason="real weights/images not present (expected ../shared/data beside the repository)",
)


def random_model(name: str = "deit_tiny_patch16_224", seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised deit_tiny as a local safetensors checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "deit_tiny_random.safetensors"
    save_file(random_model().state_dict(), str(path))
    return path


def calib_images(n: int = 8, seed: int = 0, size: int = 224) -> torch.Tensor:
    """Smooth random images: more structured than white noise, so activations are correlated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size // 16, size // 16, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def adopt(model: torch.nn.Module):
    """The Loaded wrapper corp builds around an in-memory model (its family, identity, preprocessing)."""
    from corp_cli.api import as_loaded

    return as_loaded(model)


def save_model(folder: Path, model, **extra_meta: object) -> Path:
    """Write a (pruned) model as a corp checkpoint, with the base/preprocessing record a reload needs."""
    from corp_cli.compact import save_pruned_checkpoint

    loaded = adopt(model) if isinstance(model, torch.nn.Module) else model
    meta = {"base": loaded.identity.to_dict(), "preprocessing": loaded.preprocessing.to_dict(), **extra_meta}
    folder.mkdir(parents=True, exist_ok=True)
    save_pruned_checkpoint(folder, loaded, meta)
    return folder


def narrowed(name: str, blocks: list[dict[str, int]], family: str = "timm-vit", **kwargs: object) -> torch.nn.Module:
    """A model with the given per-block widths, built the way load_pruned builds one (weights random)."""
    from corp_cli.registry import by_name

    return by_name(family).build({"family": family, "base_model": name, "model_kwargs": kwargs, "blocks": blocks}).eval()


def _predict(keep: Tensor, prune: Tensor, sol: engine.RidgeSolution):
    def on(h: Tensor) -> Tensor:
        out = h.clone()
        out[..., prune] = (h[..., keep].double() @ sol.b.T + sol.c).to(h.dtype)
        return out
    return on


def masked_reference(dense, masks, stats, blocks):
    """The dense model (a Loaded) with hooks that do what the compacted weights do: predict removed units
    (MLP hidden units, attention output dims and heads), mix kept Q/K dims."""
    fam, model = dense.family, copy.deepcopy(dense.model)
    ref = dataclasses.replace(dense, model=model)
    for i, bm in enumerate(masks):
        entry = blocks[i]
        heads = bm.heads if bm.heads is not None else torch.arange(fam.shape(dense.model, i).num_heads)
        if bm.vo is not None or bm.heads is not None:
            intercept = fam.vo_weights(dense.model, i).out_bias is not None
            m = engine.fit_moments(stats.blocks[i]["vo"], intercept=intercept)
            keep = o_kept_dims(fam.shape(dense.model, i), bm.heads, bm.vo)
            prune = engine.complement(keep, m.mean.shape[0])
            fam.vo_hook(model, i, _predict(keep, prune, engine.ridge_compensation(m, keep, prune, entry["vo"]["lambda"])))
        if bm.mlp is not None:
            # an output projection without a bias is compensated without intercept (engine.fit_moments)
            intercept = fam.mlp_weights(dense.model, i).out_bias is not None
            m = engine.fit_moments(stats.blocks[i]["mlp"], intercept=intercept)
            keep = bm.mlp
            prune = engine.complement(keep, m.mean.shape[0])
            fam.mlp_hook(model, i, _predict(keep, prune, engine.ridge_compensation(m, keep, prune, entry["mlp"]["lambda"])))
        if bm.attn is not None:
            st = stats.blocks[i]["attn"]
            n = int(st["count"].sum())
            d = st["q_gram"].shape[-1]
            keep = bm.attn  # rows: the kept heads, or under grouped-query attention the kept kv heads
            shape = fam.shape(dense.model, i)
            kv = kv_heads_of(heads, shape)
            group = torch.searchsorted(kv, heads // group_size(shape))  # kept query head -> its row of keep
            lam = torch.tensor(entry["attn"]["lambda_per_head"], dtype=torch.float64)
            lay = rotary_layout(fam, dense.model, i)
            mix = torch.zeros(len(heads), d, keep.shape[1], dtype=torch.float64)  # q_S' = q^T mix, (Hk, d, ds)
            if lay is None:
                prune = torch.stack([engine.complement(k, d) for k in keep])
                sol = engine.qk_compensation(st["q_gram"][heads] / n, st["k_gram"][heads] / n, keep, prune, lam=None,
                                             scale=fam.softmax_scale(dense.model, i))
                for j in range(len(heads)):
                    mix[j, keep[j]] = torch.eye(keep.shape[1], dtype=torch.float64) + sol.m[j]
            else:  # whole rotary pairs; every dim of a query head mixed into its kept ones (q, k before the rotation)
                pairs = engine.rotary_pairs_of_dims(lay.pairs, keep)
                sol = engine.rotary_mix_compensation(st["q_gram"][heads] / n, st["k_gram"][kv] / n, lay.pairs, pairs,
                                                     group, lay.angles, lay.weights,
                                                     scale=fam.softmax_scale(dense.model, i))
                assert torch.equal(sol.kept, keep[group])
                mix = sol.m.clone()
                for j in range(len(heads)):
                    mix[j, keep[group[j]], torch.arange(keep.shape[1])] += 1.0
            assert torch.allclose(sol.lam, lam)

            def on_qk(q: Tensor, k: Tensor, keep: Tensor = keep, mix: Tensor = mix, heads: Tensor = heads,
                      kv: Tensor = kv, group: Tensor = group) -> tuple[Tensor, Tensor]:
                # a removed head's output is replaced by the V/O prediction: its logits do not matter
                q2, k2 = q.clone(), k.clone()
                for j, h in enumerate(heads.tolist()):
                    s = keep[group[j]]
                    q2[:, h] = 0  # logit = q^T mix k_S, removed dims contribute nothing
                    q2[:, h][..., s] = (q[:, h].double() @ mix[j]).to(q.dtype)
                for j, g in enumerate(kv.tolist()):
                    k2[:, g] = 0
                    k2[:, g][..., keep[j]] = k[:, g][..., keep[j]]
                return q2, k2

            fam.qk_hook(model, i, on_qk)
    return ref


STORIES260K = SHARED_DATA / "llama-stories260k"
STORIES = STORIES260K / "stories.txt"
needs_stories = pytest.mark.skipif(not (STORIES260K / "model.safetensors").is_file() or not STORIES.is_file(),
                                   reason="the real TinyStories Llama (../shared/data/llama-stories260k) is not present")
# Small random decoders of each layout, with a 512-token byte-level BPE tokenizer built offline.
DECODER_LAYOUTS = {
    # grouped-query attention (4 query heads share 2 K/V heads), tied embeddings: Llama / stories260k style
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    # q/k/v biases (Qwen2 always has them), untied LM head
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    # sliding-window attention, no GQA
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 4, "sliding_window": 8,
                                                        "tie_word_embeddings": False}),
}


@functools.lru_cache(maxsize=1)
def _byte_bpe() -> object:
    """A 512-entry byte-level BPE (<unk>, <s>, </s>, then bytes and merges) trained on pydoc: no download."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def tiny_decoder(folder: Path, layout: str = "llama", seed: int = 0, tokenizer: bool = True, **overrides: object) -> Path:
    """A random 2-layer decoder LM of `layout` saved as a Hugging Face folder, with a small tokenizer of its own."""
    import transformers

    cfg_cls, model_cls, extra = DECODER_LAYOUTS[layout]
    kw = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **extra)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    model.save_pretrained(folder)
    if tokenizer:
        transformers.PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(), bos_token="<s>", eos_token="</s>",
                                             unk_token="<unk>").save_pretrained(folder)
    return folder
