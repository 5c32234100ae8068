"""bench/vs_trl_grpo.py's reward function, in TRL's signature (both sides load this same file): the share of
the expected numbers a completion gets right before its first mistake, so a partly right count earns part of
the reward and sampled answers differ within a group."""


def count_reward(prompts, completions, answer, **_):
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        said, wanted = completion.split(), expected.split()
        right = 0
        while right < min(len(said), len(wanted)) and said[right] == wanted[right]:
            right += 1
        rewards.append(right / len(wanted) - 0.1 * max(0, len(said) - len(wanted)) / len(wanted))
    return rewards
