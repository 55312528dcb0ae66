"""Helpers for the verifier tests: per-sample functions that spawned workers import by name, and
math answer-equivalence cases.

pytest puts tests/unit on sys.path (its default "prepend" import mode; tests/unit has no
__init__.py) and spawned workers receive the parent's sys.path, so workers import this module as
`_verifiers`. Keep it free of test-only imports: every worker imports it.
"""

import os
import signal
import time


def by_response(prompt: str, response: str, metadata: dict) -> float:
    """Does what the response says: "ok:<x>" returns x, "pid" the worker's pid, "nap:<s>" sleeps
    s seconds then returns the pid; "raise", "nan", "sleep", "spin", "exit", "sigkill" fail."""
    if response.startswith("ok:"):
        return float(response[3:])
    if response.startswith("nap:"):
        time.sleep(float(response[4:]))
        return float(os.getpid())
    if response == "pid":
        return float(os.getpid())
    if response == "raise":
        raise RuntimeError("verifier bug")
    if response == "nan":
        return float("nan")
    if response == "sleep":
        time.sleep(1000)
    if response == "spin":
        while True:
            pass
    if response == "exit":
        os._exit(1)
    if response == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError(f"unknown test response {response!r}")


# (ground truth, response, math_verify reward, dapo reward), checked against math-verify 0.9.0.
# math-verify compares values and takes a \boxed{} or $...$ answer, else the last number; DAPO
# compares Minerva-normalized strings after the last "Answer:".
MATH_EQUIVALENCE_CASES = [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5", 1.0, 0.0),
    (r"\frac{1}{2}", r"The answer is $\dfrac{1}{2}$.", 1.0, 0.0),
    (r"\frac{1}{2}", r"\boxed{\tfrac12}", 1.0, 0.0),
    (r"\frac{1}{2}", r"Answer: \frac{1}{2}", 1.0, 1.0),
    (r"\frac{1}{2}", "Answer: 1/2", 1.0, 0.0),
    (r"\frac{1}{2}", r"Answer: \frac12", 0.0, 1.0),  # math-verify: unboxed, the last number is "2"
    (r"\frac{1}{2}", r"Answer: \dfrac{1}{2}", 0.0, 0.0),  # Minerva keeps "dfrac"; math-verify reads "2"
    (r"\frac{1}{2}", "Answer: 0.6", 0.0, 0.0),
    ("0.5", r"\boxed{\frac{1}{2}}", 1.0, 0.0),
    (r"\dfrac{3}{4}", "0.75", 1.0, 0.0),
    (r"\dfrac{3}{4}", r"Answer: \dfrac{3}{4}", 0.0, 1.0),
    # units
    ("68", "68 apples", 1.0, 0.0),
    ("68", "Answer: 68 apples", 1.0, 0.0),  # Minerva removes a fixed list of units; not "apples"
    ("68", "Answer: 68 dollars", 1.0, 1.0),
    ("5", "Answer: 5 cm", 1.0, 1.0),
    ("5", r"\boxed{5\text{ cm}}", 1.0, 0.0),
    ("5 cm", "Answer: 5", 1.0, 1.0),
    ("5", "Answer: 6 cm", 0.0, 0.0),
    # percentages
    (r"25\%", "25%", 1.0, 0.0),
    (r"25\%", r"Answer: 25\%", 1.0, 1.0),
    (r"25\%", "Answer: 25%", 1.0, 0.0),
    (r"25\%", "0.25", 1.0, 0.0),
    ("25", "25%", 1.0, 0.0),  # math-verify's percentage rule accepts both 25 and 0.25 for 25%
    ("25", "0.25", 0.0, 0.0),
    # thousands separators
    ("1000", "1,000", 1.0, 0.0),
    ("1000", "Answer: 1,000", 1.0, 1.0),
    ("1000", r"Answer: 1{,}000", 0.0, 1.0),
    ("1,000", "Answer: 1000", 1.0, 1.0),
    ("1000", r"\boxed{1\,000}", 0.0, 0.0),  # a thin space defeats both
    ("1000", "Answer: 1,001", 0.0, 0.0),
]
