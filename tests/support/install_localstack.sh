#!/usr/bin/env bash
# Install LocalStack's S3 (PyPI localstack-core, no Docker) into its OWN venv, apart from the
# project's, for tests/support/localstack.py. Idempotent: a quick no-op when already installed.
#
#   tests/support/install_localstack.sh            # venv at ${INBOX_LOCALSTACK_VENV:-/opt/inbox-localstack}
#   INBOX_LOCALSTACK_VENV=/some/dir tests/support/install_localstack.sh
#
# Pins (see /work/shared/ENGINE-NOTES.md "S3-compatible servers here"): Python 3.11 needs
# localstack-core 4.13.1 (later releases use 3.12-only syntax), with cbor2<6, pyopenssl<26,
# cryptography<47 and service_identity.
set -euo pipefail

VENV="${INBOX_LOCALSTACK_VENV:-/opt/inbox-localstack}"
PYTHON="${INBOX_LOCALSTACK_PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
LOCALSTACK_VERSION="4.13.1"
PINS=("localstack-core[base-runtime]==${LOCALSTACK_VERSION}" "cbor2<6" "pyopenssl<26"
      "cryptography<47" "service_identity")
STAMP="$VENV/.inbox-localstack-installed"
WANT="localstack-core ${LOCALSTACK_VERSION}; ${PINS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]] \
   && "$VENV/bin/python" -c "import localstack.runtime.main" >/dev/null 2>&1; then
  echo "localstack already installed in $VENV"
  exit 0
fi

echo "installing localstack-core ${LOCALSTACK_VERSION} into $VENV"
rm -f "$STAMP"
"$PYTHON" -m venv "$VENV"
pip_install() {
  # The machine's pip config lists local indexes that lack most packages: drop that noise.
  "$VENV/bin/python" -m pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
pip_install --upgrade pip
pip_install "${PINS[@]}"
"$VENV/bin/python" -c "import localstack.runtime.main, localstack.services.s3.provider"
echo "$WANT" > "$STAMP"
echo "localstack installed in $VENV"
