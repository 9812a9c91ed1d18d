"""RL fine-tuning (``capability.kind: grpo``): TRL's GRPOTrainer with tether's preservation methods.

``rewards`` — the reward-function registry and guard; ``rater`` — the aligned rater;
``preserve`` — what each method does in a GRPO run; ``grpo`` — the trainer and ``run_grpo``
(imports torch and TRL, so it is imported only where a run starts).
"""
