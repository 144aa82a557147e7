#!/bin/sh
# A launcher script as users write them (run with `megascope agent --no-python -- sh wrapper.sh ARGS`): it sets
# something up, then runs the training script as its child (no exec), so the rank's process is this shell.
export PLAIN_DDP_WRAPPED=1
"${PYTHON:-python}" "$(dirname "$0")/plain_ddp.py" "$@"
