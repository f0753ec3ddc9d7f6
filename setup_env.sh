# For people who cannot install the package: `source setup_env.sh` puts this checkout's src/ on PYTHONPATH,
# so `python examples/...` and `python -m flash_experts.cli.main ...` import it from here.
# (The dependencies still have to be there: pip install -r requirements.txt, or the README's command one.)
_flash_experts_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
export PYTHONPATH="${_flash_experts_root}/src${PYTHONPATH:+:${PYTHONPATH}}"
echo "PYTHONPATH now starts with ${_flash_experts_root}/src"
unset _flash_experts_root
