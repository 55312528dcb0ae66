"""Math answers checked against a reference: Math-Verify (default) or the DAPO string verifier.

Rewards are 1.0 (correct) or 0.0 (wrong, unparsable, or the verifier failed).

verifier="math_verify" (math-verify 0.9): the ground truth is wrapped in \\boxed{...} unless it
already contains \\boxed, and parsed with math-verify's default extraction (LaTeX, then plain
expressions); the response is parsed with the same default extraction and the two compared
with `math_verify.verify(gold, answer)` (symbolic and numeric equality). What that means in
practice, checked against math-verify 0.9.0 with ground truth "68":
  - "\\boxed{68}", "68", "$68$", "68.0", "The answer is 68.", "Answer: 68", "68 apples",
    "I think 67 then 68" -> 1.0: a \\boxed{} answer wins wherever it is; otherwise the *last*
    number in the text is taken;
  - "68 68 7" -> 0.0 (the last number, 7, is taken), "7 68 68" -> 1.0;
  - "", "   ", "sixty-eight", "<answer>68</answer>" -> 0.0 (nothing parsable; the answer tags
    hide the number from both extractors);
  - "\\boxed{68}\\boxed{7}" -> 0.0 (read as the set {7, 68}); "68%" -> 1.0 (read as 68/100
    and accepted by its percentage rule); "68,000" -> 68000.
  - fractions: ground truth "\\frac{1}{2}" accepts "0.5", "1/2", "\\frac{1}{2}", "0.50";
    ground truth "0.5" accepts "\\frac{1}{2}" (decimals become rationals when parsed).
  - non-numeric answers written as plain text ("x^2+1", "(1,2)", "A", "3+2i") are NOT
    extracted (the plain-expression extractor takes numbers); they must be in $...$ or \\boxed{}.
Timeouts: math-verify bounds each parse and each comparison with signal.alarm, which exists only
in the main thread of the main interpreter (elsewhere math-verify raises ValueError). Inputs such
as "$9^{9^{9^{9}}}$" make sympy run forever, so the bound matters: `timeout_s` (default 5 s,
whole seconds) is passed as `parsing_timeout`/`timeout_seconds`, and `score()` raises if called
off the main thread while it is set in-process. num_workers > 0 runs the verifier in worker
processes' main threads (any calling thread then works) and adds `call_timeout_s`, a hard bound
on each call that kills the worker; or pass timeout_s=None to run unbounded (any thread). We pass
raise_on_error=True so that parser/comparison errors and timeouts reach `score_each` and are
counted in env/verifier_errors instead of silently scoring 0.

verifier="dapo": the DAPO recipe's verifier (verl `math_dapo.compute_score`): in the last 300
characters of the response, the text after the last "Answer:" (case-insensitive, to the end of
its line), Minerva-normalized (Lewkowycz et al. 2022, appendix D.1), must equal the normalized
ground truth as a string. verl returns +1/-1; here 1.0/0.0 like every posttrain environment
(shift rewards with reward shaping if you want +-1).
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any, Literal

from posttrain.environments.base import ScoringStats, score_each
from posttrain.environments.workers import verifier_pool

Verifier = Literal["math_verify", "dapo"]
VERIFIERS: tuple[Verifier, ...] = ("math_verify", "dapo")


class MathEnvironment:
    """Reward 1.0 when the response's final answer equals metadata["ground_truth"], else 0.0.

    Options (the recipe's `env.options`):
      verifier: "math_verify" (default) or "dapo"; see the module docstring.
      timeout_s: math-verify's own bound, in whole seconds, on each parse and each comparison
        (signal.alarm, so main thread only; None: unbounded). Unused by "dapo". Its timeouts
        raise and count in env/verifier_errors.
      num_workers: 0 (default) scores in this process, one response after the other; N > 0
        scores in a pool of N worker processes (`posttrain.environments.workers`), in parallel,
        each call in a worker's main thread, so score() may then be called from any thread.
      call_timeout_s: with num_workers > 0, the pool's bound in seconds on one response's whole
        call (default 10.0): a call past it is killed (its worker replaced) and counts in
        env/verifier_timeouts. It is the backstop for what signal.alarm cannot interrupt (a long
        C call inside sympy). timeout_s bounds each of math-verify's three steps (parse the
        ground truth, parse the response, compare), so keep call_timeout_s above timeout_s: the
        alarm is cheaper (no worker restart). Setting it without workers is an error.
    """

    @property
    def overlaps_generation(self) -> bool:
        """Scored on a worker thread during generation (Environment) unless it needs signal.alarm."""
        return self._pool is not None or self.verifier != "math_verify" or self.timeout_s is None

    def __init__(
        self,
        verifier: Verifier = "math_verify",
        *,
        timeout_s: int | None = 5,
        num_workers: int = 0,
        call_timeout_s: float | None = None,
    ) -> None:
        if verifier not in VERIFIERS:
            raise ValueError(f"unknown math verifier {verifier!r}; choose one of {list(VERIFIERS)}")
        if timeout_s is not None and (not isinstance(timeout_s, int) or timeout_s < 1):
            raise ValueError(
                "timeout_s must be a whole number of seconds >= 1 (signal.alarm) or None, "
                f"got {timeout_s!r}"
            )
        self.verifier = verifier
        self.timeout_s = timeout_s
        self._score_one = functools.partial(score_math, verifier=verifier, timeout_s=timeout_s)
        self._pool = verifier_pool(num_workers, call_timeout_s)
        self._stats = ScoringStats()

    def score(
        self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]
    ) -> list[float]:
        for meta in metadata:
            if not isinstance(meta.get("ground_truth"), str):
                raise ValueError(
                    f"{meta.get('origin', '<no origin>')}: the math environment needs a string "
                    f"'ground_truth' in each metadata dict, got {meta.get('ground_truth')!r}"
                )
        uses_alarm = self.verifier == "math_verify" and self.timeout_s is not None and self._pool is None
        if uses_alarm and threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "MathEnvironment(timeout_s=...) uses signal.alarm, which works only in the main "
                "thread; score from a process's main thread, pass num_workers > 0, or pass "
                "timeout_s=None and bound the time yourself"
            )
        return score_each(self._score_one, prompts, responses, metadata, self._stats, self._pool)

    def pop_metrics(self) -> dict[str, float]:
        return self._stats.pop()

    def close(self) -> None:
        """Stop the worker processes, if any (they also stop at interpreter exit)."""
        if self._pool is not None:
            self._pool.close()


def score_math(
    prompt: str, response: str, metadata: dict[str, Any], *, verifier: Verifier, timeout_s: int | None
) -> float:
    """One response's reward. Module-level with plain options, so that worker processes can unpickle it."""
    # Module-level lookups at call time, so tests can substitute a failing verifier.
    if verifier == "math_verify":
        return math_verify_reward(response, metadata["ground_truth"], timeout_s=timeout_s)
    return dapo_reward(response, metadata["ground_truth"])


def math_verify_reward(response: str, ground_truth: str, *, timeout_s: int | None) -> float:
    """1.0 if math-verify finds the response's answer equal to the ground truth, else 0.0.

    Raises TimeoutError when parsing or comparison runs past `timeout_s`, and ValueError when
    the ground truth itself cannot be parsed (a data problem, not a wrong answer).
    """
    from math_verify import parse, verify  # deferred: pulls in sympy
    from math_verify.errors import TimeoutException

    gold_text = ground_truth if "\\boxed" in ground_truth else f"\\boxed{{{ground_truth}}}"
    try:
        gold = parse(gold_text, parsing_timeout=timeout_s, raise_on_error=True)
        if not gold:
            raise ValueError(f"math-verify could not parse the ground truth {ground_truth!r}")
        answer = parse(response, parsing_timeout=timeout_s, raise_on_error=True)
        equal = verify(gold, answer, timeout_seconds=timeout_s, raise_on_error=True)
    except TimeoutException as error:  # a BaseException: re-raise as an ordinary Exception
        raise TimeoutError(f"math-verify ran past {timeout_s} s") from error
    return 1.0 if equal else 0.0


# --- DAPO / Minerva ----------------------------------------------------------------------------

_DAPO_TAIL_CHARS = 300  # DAPO looks only at the end of the response (longest MATH-500 answer: 159)
_DAPO_ANSWER = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)

# Minerva's answer normalization: textual substitutions, then units and filler words removed.
_MINERVA_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)  # fmt: skip
_MINERVA_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
    "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)  # fmt: skip


def minerva_normalize(answer: str) -> str:
    """Minerva's final-answer normalization, as in verl's `normalize_final_answer`."""
    answer = answer.split("=")[-1]  # "x = 5" -> " 5"
    for before, after in _MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for removed in _MINERVA_REMOVED:
        answer = answer.replace(removed, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)  # keep the first $...$ only
    for command in ("text", "textbf", "overline"):
        answer = re.sub(rf"(\\{command}\{{)(.*?)(\}})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)  # \sqrt2 -> \sqrt{2}
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # 1,000 -> 1000
        answer = answer.replace(",", "")
    return answer.strip()


def dapo_reward(response: str, ground_truth: str) -> float:
    """1.0 if the last "Answer: ..." in the response's last 300 characters matches, else 0.0."""
    matches = _DAPO_ANSWER.findall(response[-_DAPO_TAIL_CHARS:])
    if not matches:
        return 0.0
    return 1.0 if minerva_normalize(matches[-1]) == minerva_normalize(ground_truth) else 0.0
