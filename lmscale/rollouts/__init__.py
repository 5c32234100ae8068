"""Online RL's data (GRPO): completions sampled from the policy inside the training engine, scored by reward
functions, and turned into micro-batches for the loop. `schedule` says which prompts each rank answers at
each step, `generation` samples (seeded, so a resumed run samples the same), `scoring` turns rewards into
advantages and figures, `stream` hands the loop its micro-batches and `evaluation` scores greedy answers to
held-out prompts."""
