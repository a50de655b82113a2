#!/bin/bash
# Run the Xen testbed (../shared/xen-testbed) on this tree: stage a payload (src, the test
# backends, tapdisk/tap-ctl wrappers for dom0's python3) and start run.sh with a backend.
#
#   tests/xen/run_testbed.sh [--mini] [run.sh options...]
#
# The backend is tests/xen/mini_backend.py, a test-only XenStore handshake that hands the
# ring to our tapdisk (proves the ring alone); tests/test_xen_guest.py runs tapback.
# Env: XEN_TESTBED (default /work/shared/xen-testbed), XEN_TESTBED_DIR (the build).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TESTBED=${XEN_TESTBED:-$ROOT/../../shared/xen-testbed}
[ -x "$TESTBED/run.sh" ] || TESTBED=/work/shared/xen-testbed
[ "${1:-}" != --mini ] || shift
# The emulated CPU: see XEN_RIG_CPU in tests/conftest.py (max's AVX2 crashed dom0 programs).
export QEMU_CPU=${QEMU_CPU:-qemu64,+svm}
STAGE=$(mktemp -d "${TMPDIR:-/var/tmp}/blktap-payload.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/tests"
cp -r "$ROOT/src" "$STAGE/src"
cp -r "$HERE" "$STAGE/tests/xen"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
for tool in tapdisk:blktap.cli.tapdisk tap-ctl:blktap.cli.tap_ctl tapback:blktap.cli.tapback; do
  printf '#!/bin/sh\nexec python3 -m %s "$@"\n' "${tool#*:}" > "$STAGE/bin/${tool%%:*}"
  chmod +x "$STAGE/bin/${tool%%:*}"
done
ENV='export PYTHONPATH=/opt/payload/src TAPDISK=/opt/payload/bin/tapdisk BLKTAP_SPAWN_TIMEOUT=600 PATH=/opt/payload/bin:$PATH BLKTAP_LOG_DIR=$TESTBED_OUT/tapdisk-log;'
CMD="$ENV exec python3 /opt/payload/tests/xen/mini_backend.py \$DISK_IMAGE"
"$TESTBED/run.sh" --payload "$STAGE" --backend "$CMD" "$@"
