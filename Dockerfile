# viommud's image (docs/operations.md, "Container image").
#
# Two stages: a builder that makes a virtualenv with viommud and its dependencies, and a
# runtime stage that gets only that virtualenv, runs as an unprivileged user (uid 999), serves
# on /run/viommud/viommud.sock (a volume: bind-mount a host directory there to reach the
# socket from outside) and reports health with `viommud health` (a HELLO probe).
#
# BASE must provide python3 >= 3.11 with the venv module, at the same path in both stages.
#   docker build -t viommud .                                        # a normal machine
#   podman build --format docker --build-arg BASE=localhost/debbase:bookworm -t viommud .
# (--format docker keeps the HEALTHCHECK; podman drops it from OCI-format images.)
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer survives code changes.
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/viommud \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && /opt/viommud/bin/pip install -r /tmp/requirements.txt
COPY protocols ./protocols
COPY viommud ./viommud
RUN /opt/viommud/bin/pip install --no-deps . \
 && /opt/viommud/bin/python -m compileall -q /opt/viommud/lib

FROM ${BASE}
ARG UID=999
RUN groupadd --system --gid "${UID}" viommud \
 && useradd --system --uid "${UID}" --gid viommud --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin viommud \
 && install -d -o viommud -g viommud -m 0750 /run/viommud
COPY --from=builder /opt/viommud /opt/viommud
ENV PATH=/opt/viommud/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    VIOMMUD_SOCKET=/run/viommud/viommud.sock \
    VIOMMUD_LOG_FORMAT=json
VOLUME ["/run/viommud"]
USER viommud
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["viommud", "health", "--timeout", "2"]
ENTRYPOINT ["viommud", "serve"]
