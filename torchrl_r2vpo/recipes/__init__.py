"""What the examples and benchmarks share, one module per concern:

* ``config``: the examples' settings (:class:`~torchrl_r2vpo.recipes.config.ControlConfig`,
  :class:`~torchrl_r2vpo.recipes.config.LLMConfig`), read from the command line and validated;
* ``control``: agent, loss, optimiser, collector, evaluation and plots of ``examples/dmc_walker.py``;
* ``llm``: task, loss, rollout backend, ratio statistics and plots of ``examples/llm_math.py``;
* ``update``: the optimiser step and the epochs of minibatches over replayed data;
* ``run_state``: checkpoints, resume, stop signals, the learning curve and the logger;
* ``sweep``: runs of an example over settings and seeds, and their curves.

Import them by module: ``from torchrl_r2vpo.recipes.control import make_agent``.
"""
