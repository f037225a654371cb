#!/usr/bin/env bash
# The fallback ladder on real kernels: boots Debian's 5.10, 6.1, 6.12 and 7.3 kernels under QEMU
# (software emulation, no KVM needed) with the `ringpool` crate's integration tests in an
# initramfs, runs them there (`kernel_rungs` first: the rung the probe chose for each capability)
# and fails unless every guest reports success. See docs/KERNEL-MATRIX.md.
#
# Needs: a Debian 12 host, root (apt-get installs qemu-system-x86, busybox-static, cpio, jq and
# binutils when missing), cargo, and the Debian archive. Downloads (kernels, QEMU 10 from
# bookworm-backports) are cached in $RINGPOOL_MATRIX_CACHE, so a warm run only builds and boots.
#
# Exit status: 0 when every guest that ran passed (a kernel package the archive no longer has is
# reported as SKIPPED, not as a failure), 1 when a guest failed, hung or did not boot, 2 when the
# host could not be set up.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PROJ=$(cd "$HERE/.." && pwd)
CACHE=${RINGPOOL_MATRIX_CACHE:-/var/cache/ringpool-matrix}
OUT=${RINGPOOL_MATRIX_OUT:-$PROJ/target/kernel-matrix}
# Exact package names: Debian drops superseded kernel ABIs from the archive, so pin and cache.
# From 7.x Debian splits the image: `linux-binary-*` has the kernel (usr/lib/modules/<v>/vmlinuz),
# `linux-base-*` its config; a `linux-binary-` name here fetches both.
KERNELS=${KERNELS:-"linux-image-5.10.0-32-cloud-amd64-unsigned linux-image-6.1.0-56-cloud-amd64-unsigned linux-image-6.12.107+deb13-cloud-amd64-unsigned linux-binary-7.3.4+deb13-cloud-amd64"}
TESTARGS=${TESTARGS:-}          # extra arguments for every test binary in the guest
# Time bounds. A guest normally boots in 6-11 s and runs the suite in 45-90 s (TCG on a busy
# 2-core host; the slowest test, backpressure's 64 MiB stream, takes 20-50 s).
TEST_TIMEOUT=${TEST_TIMEOUT:-150}   # seconds one test may run inside a guest
BOOT_TIMEOUT=${BOOT_TIMEOUT:-90}    # seconds until the guest must say GUEST-UP
GUEST_TIMEOUT=${GUEST_TIMEOUT:-480} # seconds one guest may run in all (150-300 s; more on a loaded host)
MATRIX_TIMEOUT=${MATRIX_TIMEOUT:-1500} # seconds all guests together may run (they take 600-1100 s)
SMP=${SMP:-2}
# QEMU 7.2 (bookworm) crashed in 7 of 21 boots of 6.12 with -smp 2; QEMU 10 from
# bookworm-backports, only unpacked (dpkg -x), booted 20 of 20. QEMU_BPO=0 uses the system QEMU.
QEMU_BPO=${QEMU_BPO:-1}

say() { printf '%s\n' "kernel-matrix: $*"; }
die() { printf '%s\n' "kernel-matrix: ERROR: $*" >&2; exit 2; }
t_start=$SECONDS

mkdir -p "$CACHE"/{apt/lists/partial,apt/cache/archives/partial,apt/parts,kernels,debs} "$OUT" ||
  die "cannot create the cache $CACHE (set RINGPOOL_MATRIX_CACHE)"

# 1. Host tools.
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
# The initramfs needs busybox-static's /bin/busybox (the `busybox` package's one is dynamic).
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v jq >/dev/null || missing+=(jq)
command -v objcopy >/dev/null || missing+=(binutils)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null || die "apt-get install ${missing[*]} failed"
fi

# 2. Kernels and QEMU from the Debian archive, through a private apt configuration (the system's
# sources stay untouched): the archive the system uses, other suites of it.
K=/usr/share/keyrings/debian-archive-keyring.gpg
MAIN=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n 1 || true)
SEC=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep security | head -n 1 || true)
MAIN=${MAIN:-http://deb.debian.org/debian}
SEC=${SEC:-http://deb.debian.org/debian-security}
{
  for suite in bullseye bookworm trixie bookworm-backports trixie-backports; do echo "deb [signed-by=$K] $MAIN $suite main"; done
  for suite in bullseye-security bookworm-security trixie-security; do echo "deb [signed-by=$K] $SEC $suite main"; done
} >"$CACHE/apt/sources.list"
APTO=(-o Dir::Etc::sourcelist="$CACHE/apt/sources.list" -o Dir::Etc::sourceparts="$CACHE/apt/parts"
  -o Dir::State::Lists="$CACHE/apt/lists" -o Dir::Cache="$CACHE/apt/cache"
  -o APT::Sandbox::User=root)
updated=0
apt_update() {
  [ $updated = 1 ] && return 0
  updated=1
  # A suite that cannot be fetched only costs the packages that live in it.
  apt-get "${APTO[@]}" update -qq 2>&1 | sed 's/^/  apt: /' >&2 || true
}
# Downloads package $1 (an apt name, optionally /suite) into the cache; false when unavailable.
fetch() {
  apt_update
  (cd "$CACHE/debs" && apt-get "${APTO[@]}" download -qq "$1" 2>&1 | sed 's/^/  apt: /' >&2;
    exit "${PIPESTATUS[0]}")
}

available=()
skipped=()
for pkg in $KERNELS; do
  dir="$CACHE/kernels/$pkg"
  if [ ! -f "$dir/vmlinuz" ]; then
    say "downloading $pkg"
    pkgs=("$pkg")
    case $pkg in linux-binary-*) pkgs+=("linux-base-${pkg#linux-binary-}") ;; esac
    got=1
    for p in "${pkgs[@]}"; do
      rm -f "$CACHE/debs/${p}"_*.deb
      if ! fetch "$p" || ! ls "$CACHE/debs/${p}"_*.deb >/dev/null 2>&1; then got=0; fi
    done
    if [ $got = 0 ]; then
      say "SKIPPED $pkg: kernel package ${pkgs[*]} unavailable from the archive (not a ringpool test failure)"
      skipped+=("$pkg")
      continue
    fi
    x="$CACHE/x.$$"
    rm -rf "$x"
    for p in "${pkgs[@]}"; do dpkg -x "$CACHE/debs/${p}"_*.deb "$x"; done
    mkdir -p "$dir.tmp"
    cp "$x"/boot/vmlinuz-* "$dir.tmp/vmlinuz" 2>/dev/null || cp "$x"/usr/lib/modules/*/vmlinuz "$dir.tmp/vmlinuz"
    cp "$x"/boot/config-* "$dir.tmp/config" 2>/dev/null || cp "$x"/usr/lib/modules/*/config "$dir.tmp/config"
    rm -rf "$x"
    for p in "${pkgs[@]}"; do rm -f "$CACHE/debs/${p}"_*.deb; done
    grep -q '^CONFIG_IO_URING=y' "$dir.tmp/config" || die "$pkg: kernel built without CONFIG_IO_URING"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  available+=("$pkg")
done
if [ ${#available[@]} = 0 ]; then
  say "SKIPPED: no kernel package of the matrix is available from the archive ($KERNELS);"
  say "THE KERNEL MATRIX DID NOT RUN (not a ringpool test failure)"
  exit 0
fi

QEMU=qemu-system-x86_64
QEMU_L=()
if [ "$QEMU_BPO" = 1 ]; then
  q="$CACHE/qemu-bpo"
  if [ ! -x "$q/usr/bin/qemu-system-x86_64" ]; then
    say "downloading QEMU from bookworm-backports"
    rm -rf "$q" "$CACHE"/debs/qemu-system-*.deb
    if ! fetch qemu-system-x86/bookworm-backports || ! fetch qemu-system-data/bookworm-backports; then
      say "SKIPPED: qemu-system-x86 from bookworm-backports unavailable from the archive (QEMU_BPO=0 uses the system QEMU)"
      say "THE KERNEL MATRIX DID NOT RUN (not a ringpool test failure)"
      exit 0
    fi
    for d in "$CACHE"/debs/qemu-system-*.deb; do dpkg -x "$d" "$q.tmp"; done
    rm -f "$CACHE"/debs/qemu-system-*.deb
    mv "$q.tmp" "$q"
  fi
  QEMU="$q/usr/bin/qemu-system-x86_64"
  QEMU_L=(-L "$q/usr/share/qemu")
fi
say "$("$QEMU" --version | head -n 1)" || die "$QEMU does not run"
say "setup took $((SECONDS - t_start)) s"

# 3. The `ringpool` crate's integration test binaries (crates/ringpool/tests/*.rs) and the
# `ringpool` command, from the very build the README's test command made (`cargo test
# --workspace --release`: the workspace builds ringpool with its `tokio` feature, so `rt_tokio`
# has tests, and `.ci/run` has built them already, so this step only lists them). They are
# dynamically linked: step 4 copies their loader and libraries into the initramfs. The command
# goes in as /bin/ringpool: `tests/zcrx_cli.rs` runs it where the kernel has device-less zero-copy
# receive (the CLI crate's own tests cannot run in a guest).
cd "$PROJ"
t_build=$SECONDS
json=$(cargo test --workspace --release --no-run --message-format=json-render-diagnostics) ||
  { echo "kernel-matrix: building the test binaries failed" >&2; exit 1; }
mapfile -t BINS < <(jq -r 'select(.reason=="compiler-artifact" and .profile.test and .executable!=null
    and (.target.kind|index("test")) and (.manifest_path|endswith("crates/ringpool/Cargo.toml")))
    | "\(.target.name) \(.executable)"' <<<"$json")
[ ${#BINS[@]} -gt 0 ] || { echo "kernel-matrix: no integration test binaries" >&2; exit 1; }
cli_json=$(cargo build -p ringpool-cli --release --message-format=json-render-diagnostics) ||
  { echo "kernel-matrix: building the ringpool command failed" >&2; exit 1; }
CLI=$(jq -r 'select(.reason=="compiler-artifact" and .executable!=null and .target.name=="ringpool"
    and (.target.kind|index("bin"))) | .executable' <<<"$cli_json" | tail -n 1)
[ -x "$CLI" ] || { echo "kernel-matrix: no ringpool command" >&2; exit 1; }
say "built ${#BINS[@]} test binaries and the ringpool command in $((SECONDS - t_build)) s"

# 4. initramfs: busybox, /init, the binaries, and /tests/ORDER (kernel_rungs first).
root="$OUT/root"
rm -rf "$root" && mkdir -p "$root/bin" "$root/tests"
cp /bin/busybox "$root/bin/"
objcopy --strip-debug "$CLI" "$root/bin/ringpool"
cp "$HERE/init" "$root/init" && chmod 755 "$root/init"
names=()
for b in "${BINS[@]}"; do
  name=${b%% *}
  # Without debug info (symbols stay, so a panic's backtrace still names functions): a sixth
  # of the size (280 to 44 MB unpacked), and the emulated guest unpacks it faster.
  objcopy --strip-debug "${b#* }" "$root/tests/$name"
  names+=("$name")
done
# The host's dynamic loader and the libraries the binaries link, at the paths they name.
for lib in $(ldd "$CLI" "${BINS[@]#* }" | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
  mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"
done
{ printf '%s\n' "${names[@]}" | grep -x kernel_rungs || { echo "kernel-matrix: no kernel_rungs test" >&2; exit 1; }
  printf '%s\n' "${names[@]}" | grep -vx kernel_rungs | sort; } >"$root/tests/ORDER"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 >"$OUT/initramfs.cpio.gz")

# 5. Boot each kernel. Only the `GUEST-RESULT rc=0` line counts (QEMU exits 0 whatever the guest
# did); a guest that does not say GUEST-UP within BOOT_TIMEOUT, or does not finish within
# GUEST_TIMEOUT, is stopped and failed.
fail=0
summary=()
t_guests=$SECONDS
for pkg in "${available[@]}"; do
  raw="$OUT/$pkg.raw"
  log="$OUT/$pkg.log"
  left=$((MATRIX_TIMEOUT - (SECONDS - t_guests)))
  if [ $left -le 0 ]; then
    summary+=("FAIL    $pkg: not run, the guests used up MATRIX_TIMEOUT (${MATRIX_TIMEOUT} s)")
    fail=1
    continue
  fi
  limit=$((left < GUEST_TIMEOUT ? left : GUEST_TIMEOUT))
  say "booting $pkg (time limit $limit s)"
  t0=$SECONDS
  "$QEMU" "${QEMU_L[@]}" -accel tcg -cpu max -m 1024 -smp "$SMP" \
    -bios qboot.rom -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel "$CACHE/kernels/$pkg/vmlinuz" -initrd "$OUT/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 oops=panic quiet TEST_TIMEOUT=$TEST_TIMEOUT TESTARGS=\"$TESTARGS\"" \
    </dev/null >"$raw" 2>&1 &
  qpid=$!
  why=""
  while kill -0 "$qpid" 2>/dev/null; do
    sleep 1
    el=$((SECONDS - t0))
    if [ $el -ge "$BOOT_TIMEOUT" ] && ! grep -aq '^GUEST-UP' "$raw"; then
      why="did not boot: no GUEST-UP within ${BOOT_TIMEOUT} s"
    elif [ $el -ge "$limit" ]; then
      why="hung: still running after $limit s (GUEST_TIMEOUT=$GUEST_TIMEOUT, MATRIX_TIMEOUT=$MATRIX_TIMEOUT)"
    fi
    if [ -n "$why" ]; then
      kill "$qpid" 2>/dev/null || true
      sleep 1
      kill -9 "$qpid" 2>/dev/null || true
      break
    fi
  done
  wait "$qpid" || true
  secs=$((SECONDS - t0))
  tr -d '\r' <"$raw" >"$log" && rm -f "$raw"
  short=$(sed -n 's/^GUEST-UP .* kernel=\([^ ]*\).*/\1/p' "$log" | head -n 1)
  short=${short:-$pkg}
  if grep -aq '^GUEST-UP' "$log"; then
    sed -n '/^GUEST-UP/,$p' "$log" | sed "s/^/[$short] /"
  else
    tail -n 40 "$log" | sed "s/^/[$pkg] /"
  fi
  if [ -z "$why" ] && ! grep -aq '^GUEST-UP' "$log"; then
    why="did not boot (QEMU ended without GUEST-UP)"
  fi
  if [ -z "$why" ] && grep -aqE 'Kernel panic|Oops|BUG:' "$log"; then
    why="kernel panic or oops (see the log)"
  fi
  major_minor=$(sed -n 's/^\([0-9]*\.[0-9]*\).*/\1/p' <<<"$short")
  if [ -z "$why" ] && ! grep -aq '^GUEST-RESULT rc=0$' "$log"; then
    why="tests failed: $(grep -a '^=== TEST .* \(FAILED\|TIMEOUT\)' "$log" | sed 's/^=== TEST //' | paste -sd ';' -)"
    grep -aq '^GUEST-RESULT' "$log" || why="guest stopped before GUEST-RESULT (crash?)"
  fi
  if [ -z "$why" ] && ! grep -aq "^RUNG-TABLE-OK kernel=$major_minor\$" "$log"; then
    why="kernel_rungs did not check the rung table (no entry for kernel $major_minor?)"
  fi
  counts="$(grep -ac '^=== TEST .* ok secs=' "$log" || true) tests passed, $(grep -ac '^skipped: ' "$log" || true) feature skips"
  if [ -z "$why" ]; then
    summary+=("PASS    $pkg ($short) in $secs s: $counts")
  else
    summary+=("FAIL    $pkg ($short) in $secs s: $why - log: $log")
    fail=1
  fi
done
for pkg in "${skipped[@]}"; do
  summary+=("SKIPPED $pkg: kernel package $pkg unavailable from the archive")
done

say "summary (total $((SECONDS - t_start)) s):"
printf '  %s\n' "${summary[@]}"
if [ $fail != 0 ]; then
  say "FAILED"
  exit 1
fi
say "OK"
