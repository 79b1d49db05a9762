# shellcheck shell=bash
# Sourced by launch/*.sh: sets `python` to the interpreter cic-gpt2 is installed in, or stops with one line
# that names the fix. First of: $PYTHON; the interpreter on the `#!` line of the `cic-gpt2` command on PATH
# (what `cic-gpt2 train` would run); `python` on PATH.
python="${PYTHON:-}"
if [[ -z "$python" ]] && cic_gpt2=$(command -v cic-gpt2); then
    read -r shebang <"$cic_gpt2" || true
    python="${shebang#\#!}"
    [[ "$python" == */python* && -x "$python" ]] || python=""  # `#!/usr/bin/env ...`, pip's `#!/bin/sh` form
fi
python="${python:-python}"
if ! "$python" -c 'import importlib.util as u, cic_gpt2; assert all(map(u.find_spec, ("torch", "deepspeed")))' 2>/dev/null; then
    echo "${0##*/}: '$python' cannot import cic_gpt2 with torch and deepspeed: activate the environment cic-gpt2 is installed in, or set PYTHON=/path/to/that/env/bin/python" >&2
    exit 2
fi
