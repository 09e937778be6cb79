#!/usr/bin/env bash
# Builds the Debian package: both binaries, the systemd units, the example
# configuration, the docs, and the `understudy` system user (made by postinst).
#
#   packaging/build-deb.sh                 # cargo build --release, then the .deb
#   packaging/build-deb.sh --profile dev --no-build
#                                          # package target/debug as built (CI: the
#                                          # binaries `cargo test` just built)
#
# Output: target/deb/understudy_<version>_<arch>.deb. Install with
#   sudo apt install ./target/deb/understudy_*.deb
#   sudo systemctl enable --now understudy-backup@web1   # or understudy-primary@web1
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --no-build) build=no; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release) bindir=target/release; flags=(--release) ;;
  dev) bindir=target/debug; flags=() ;;
  *) echo "build-deb.sh: --profile is release or dev" >&2; exit 2 ;;
esac
if [ "$build" = yes ]; then
  cargo build "${flags[@]}" -p understudy --bins >&2
fi
for bin in understudyd understudyctl; do
  if [ ! -x "$bindir/$bin" ]; then
    echo "build-deb.sh: $bindir/$bin is missing: build it (or drop --no-build)" >&2
    exit 1
  fi
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
name="understudy_${version}_${arch}"
root="target/deb/$name"
rm -rf "$root"
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
  "$root/lib/udev/rules.d" "$root/etc/understudy" "$root/usr/share/doc/understudy"
install -m 0755 "$bindir/understudyd" "$bindir/understudyctl" "$root/usr/bin/"
strip --strip-debug "$root/usr/bin/understudyd" "$root/usr/bin/understudyctl"
install -m 0644 systemd/understudy-primary@.service systemd/understudy-backup@.service \
  "$root/lib/systemd/system/"
install -m 0644 packaging/udev/60-understudy-userfaultfd.rules "$root/lib/udev/rules.d/"
install -m 0644 systemd/example.toml "$root/etc/understudy/example.toml"
install -m 0644 README.md docs/OPERATIONS.md docs/ARCHITECTURE.md "$root/usr/share/doc/understudy/"
install -m 0644 docs/grafana/understudy.json "$root/usr/share/doc/understudy/grafana-dashboard.json"

installed_kib=$(du -sk "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$installed_kib/" \
  packaging/debian/control > "$root/DEBIAN/control"
install -m 0644 packaging/debian/conffiles "$root/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$root/DEBIAN/"

dpkg-deb --root-owner-group --build "$root" "target/deb/$name.deb" >/dev/null
echo "target/deb/$name.deb"
