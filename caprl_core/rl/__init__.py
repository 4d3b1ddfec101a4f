"""The RL step of `python -m caprl_core.train`, one module per phase:

    rollout   the step's images and G captions each, sampled by the policy (paged engine, log-probs recorded)
    scoring   the reader's rewards, gathered over ranks, and group-normalised advantages
    batches   the update's micro-batches and the policy's log-probs of their caption tokens (fused lm_head op)
    update    clipped-GRPO passes, one optimizer step each
    step      `Run.step`: the phases above, top to bottom
    setup     models, data, sampler, reward, optimizer and schedule of a run
    state     checkpoints and resume, one process or several ranks
    progress  peak memory per phase, the progress bar, the metrics log
    lifecycle the run directory: a resume's saved config, --overwrite, plot cadence, Ctrl-C
    heldout   --eval-every: the caption evaluation of `python -m caprl_core.eval` on the training policy
    report    --report-to: each step's metrics also to TensorBoard or Weights & Biases

caprl_core/train.py runs the loop (step -> log -> checkpoint) and the command line.
"""
