"""Shared by the test modules: a scripted token engine (the policy of rollout tests), whose answer is
a function of the prompt's text, sampled as one id per character (ids a tokenizer would not produce
from the text) and ended with the eos token."""
from agentopd.types import Generation


def char_ids(tok, text: str) -> list[int]:
    """``text`` one character per token: valid ids that no tokenizer would produce from the text."""
    return [i for c in text for i in tok.encode(c, add_special_tokens=False)]


class ScriptedEngine:
    """Subclasses say what to answer: ``answer(prompt_text)``. ``prompts``: every prompt's ids."""

    def __init__(self, tok):
        self.tok = self.tokenizer = tok
        self.prompts = []

    def answer(self, text: str) -> str:
        raise NotImplementedError

    def generate(self, prompt_ids, n=1, **kw):
        out = []
        for ids in prompt_ids:
            self.prompts.append(list(ids))
            answer = self.answer(self.tok.decode(ids))
            rids = char_ids(self.tok, answer) + [self.tok.eos_token_id]
            out.append([Generation(rids, [-0.5] * len(rids), answer, "stop") for _ in range(n)])
        return out
