"""RL post-training math as pure functions of tensors.

advantages           group baselines and normalization (GRPO, RLOO)
reward_shaping       reward scaling, DAPO overlong penalty and overlong filtering
dynamic_sampling     DAPO dynamic sampling: drop uninformative groups, carry the surplus over
kl                   per-token KL estimators k1, k2, k3
importance_sampling  truncated importance weights for the train/generate mismatch
pg_loss              clipped policy-gradient loss (PPO clip, clip-higher, dual clip, GSPO)
mismatch             train/generate mismatch metrics

Nothing here reads a global config or runs a collective: callers pass tensors (and, for the
loss, its LossConfig and the global normalizer) and get tensors or floats back.
"""
