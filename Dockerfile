# ctprofd container image: the venv that scripts/setup.sh builds, on the same Debian release.
#
#   docker build --build-arg CTPROFD_REVISION=$(git rev-parse --short=12 HEAD) -t ctprofd:0.1.0 .
#   docker run --rm --pid=host --cap-drop=ALL --cap-add=SYS_PTRACE --cap-add=DAC_READ_SEARCH \
#       --cap-add=SETUID --cap-add=SETGID --security-opt no-new-privileges \
#       --security-opt apparmor=unconfined --read-only -p 19455:19455 ctprofd:0.1.0
#
# It runs as root inside the container, with every capability dropped but SYS_PTRACE and
# DAC_READ_SEARCH: reading the memory of host processes owned by any user takes
# CAP_SYS_PTRACE, and a non-root container user cannot hold it (runtimes give non-root users
# no ambient capabilities); and SETUID/SETGID, which only the parser worker uses, to run as
# nobody. See docs/daemon.md, "Containers and Kubernetes". tests/test_image.py builds it.

ARG DEBIAN=debian:12.8-slim

FROM ${DEBIAN} AS build
# The source revision, stamped into the package by setup.py for ctprofd_build_info and
# --version (.dockerignore keeps .git out of the build, so it cannot be asked here).
ARG CTPROFD_REVISION=""
COPY . /src
# The same setup the README uses; then ctprofd goes into the venv as a copy, so the final
# image needs the venv only, not the source tree or the compilers.
# pip and setuptools leave the venv then (25 MB the daemon never uses).
RUN CTPROFD_VENV=/opt/ctprofd /src/scripts/setup.sh \
    && /opt/ctprofd/bin/python -m pip install --no-cache-dir --progress-bar off \
        --no-deps --force-reinstall /src \
    && /opt/ctprofd/bin/python -m pip uninstall --yes pip setuptools

FROM ${DEBIAN}
# Not pinned to versions (hadolint DL3008): the base is a pinned point release, and
# Debian's archive keeps only the newest version of each package of a release (security
# fixes replace the old one), so a pinned version would stop building at the next fix.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 libsystemd0 \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/ctprofd /opt/ctprofd
COPY config/ctprofd.yaml /etc/ctprofd/ctprofd.yaml
RUN /opt/ctprofd/bin/ctprofd check-config /etc/ctprofd/ctprofd.yaml
VOLUME ["/var/cache/ctprofd", "/var/lib/ctprofd"]
EXPOSE 19455
# Root (hadolint DL3002): reading the memory of processes of every user takes
# CAP_SYS_PTRACE, which runtimes grant a non-root user only through file capabilities, and
# the kernel ignores those on the `#!` script ctprofd is; every capability but the four
# the DaemonSet adds is dropped (see the top of this file).
# hadolint ignore=DL3002
USER 0
ENTRYPOINT ["/opt/ctprofd/bin/ctprofd", "run"]
CMD ["--config", "/etc/ctprofd/ctprofd.yaml"]
