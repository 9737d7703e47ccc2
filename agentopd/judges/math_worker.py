"""A math-verify worker: one JSON request per line on stdin ({"gold", "pred"}), one reply per line.

Run as a subprocess by :class:`agentopd.judges.math.MathJudge`, which enforces the deadline from
outside (math-verify's own timeout uses SIGALRM and cannot be relied on off the main thread), so
its own timeouts are turned off here.
"""
import json
import os
import sys
import warnings


def main():
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from math_verify import parse, verify

    out = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # library chatter must not corrupt the reply stream
    out.write('{"ready": true}\n')
    out.flush()

    def p(s):
        return parse("\\boxed{" + s + "}", parsing_timeout=None)

    for line in sys.stdin:
        req = json.loads(line)
        try:
            gold, pred = p(req["gold"]), p(req["pred"])
            if not gold:
                reply = {"error": f"the reference answer {req['gold']!r} does not parse"}
            else:
                reply = {"ok": bool(pred) and bool(verify(gold, pred, timeout_seconds=None)),
                         "parsed": str(pred[-1]) if pred else ""}
        except Exception as e:  # a crashed verifier is a judge error, reported by the caller
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
