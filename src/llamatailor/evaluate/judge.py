"""An LLM judge behind any OpenAI-compatible endpoint: scores each answer 1-5 against the reference."""

import os
import re
from dataclasses import dataclass

from llamatailor.config import JudgeSection
from llamatailor.errors import StageError

JUDGE_INSTRUCTIONS = (
    "You grade an answer to a question against a reference answer. Reply with one integer from 1 to 5: "
    "1 wrong or irrelevant, 3 partly correct, 5 correct and complete. Reply with the number only."
)
SCORE = re.compile(r"\b([1-5])\b")


@dataclass(frozen=True)
class JudgeResult:
    mean_score: float | None  # 1-5, over the answers it could score
    scored: int
    unparsed: int


def judge_answers(
    judge: JudgeSection, prompts: list[str], references: list[str], answers: list[str]
) -> JudgeResult:
    from openai import OpenAI, OpenAIError

    client = OpenAI(
        base_url=judge.base_url, api_key=os.environ.get(judge.api_key_env, "none"), timeout=judge.timeout
    )
    scores, unparsed = [], 0
    for prompt, reference, answer in list(zip(prompts, references, answers, strict=True))[
        : judge.max_samples
    ]:
        question = f"Question:\n{prompt}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}"
        try:
            reply = client.chat.completions.create(
                model=judge.model,
                messages=[
                    {"role": "system", "content": JUDGE_INSTRUCTIONS},
                    {"role": "user", "content": question},
                ],
                temperature=0,
                max_tokens=8,
            )
        except OpenAIError as exc:
            raise StageError(f"eval.judge: the endpoint {judge.base_url} failed: {exc}") from None
        match = SCORE.search(reply.choices[0].message.content or "")
        if match:
            scores.append(int(match.group(1)))
        else:
            unparsed += 1
    return JudgeResult(sum(scores) / len(scores) if scores else None, len(scores), unparsed)
