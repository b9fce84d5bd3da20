"""The benchmarks' output: one JSON object per line on stdout, and appended to ``--out``."""
import json


def emit(rec, out=None):
    """Print ``rec`` (a dict) as one JSON line; append it to the file ``out`` too when given."""
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with open(out, 'a') as f:
            f.write(line + '\n')
