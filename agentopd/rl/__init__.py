"""The learner: the self-teacher's context and scoring (teacher), advantage estimators
(advantages), per-token losses (losses, objectives), log-probs of given ids (logprobs), the update
step (learner) and checkpoints."""
