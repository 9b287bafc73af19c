# Sourced by setup.sh, test.sh and run.sh: picks the one Python they all use, as $PY,
# and puts its console scripts (ekko, ekko-opt, lit, filecheck) first on PATH.
#   $PYTHON, when set;
#   else the active virtual environment's python (VIRTUAL_ENV or CONDA_PREFIX);
#   else .venv/ in the repository (git ignores it), created here on first use.
# shellcheck shell=bash

ekko_base_python() {
  # The first Python >= 3.11 on PATH, for making .venv.
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "ekko: error: ekko needs Python >= 3.11 and none was found on PATH" >&2
  return 1
}

ekko_make_venv() {
  local base
  base=$(ekko_base_python) || return 1
  echo "setup: creating .venv/ with $("$base" --version) (no virtual environment is active)" >&2
  if ! "$base" -m venv .venv; then
    rm -rf .venv
    echo "ekko: error: '$base -m venv .venv' failed; install your system's venv package" \
         "(Debian/Ubuntu: python3-venv) or activate a virtual environment, then rerun" >&2
    return 1
  fi
}

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  PY=python3
else
  [ -x .venv/bin/python ] || ekko_make_venv
  PY=$PWD/.venv/bin/python
fi
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH PY
