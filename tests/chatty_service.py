"""A stand-in service for test_devprocess: says it is listening, then logs far more than a pipe holds."""

import sys

print("chatty listening on port 0", flush=True)
for i in range(4096):
    sys.stderr.write(f"log line {i:05d} " + "x" * 240 + "\n")  # ~1 MiB in all
    print(f"stdout line {i}")  # also more than a pipe's worth on stdout
sys.stderr.flush()
