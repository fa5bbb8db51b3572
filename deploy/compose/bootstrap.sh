#!/bin/sh
# The Compose stack's one-shot bootstrap (the `bootstrap` service, in the wayang-mq image):
#   1. waits until the three RabbitMQ nodes form one cluster (quorum queues then get a member
#      on each node);
#   2. applies the topology (`wayang-mq topology apply`, idempotent) as the administrator;
#   3. migrates the control plane's database (`wayang-mq db migrate`, idempotent);
#   4. gives every daemon an identity of its own: a broker account with only its role's
#      permissions (`wayang-mq access grant`) and an Ed25519 signing key scoped to it
#      (`wayang-mq keys new`), docs/security.md sections 3 and 4.
# Layout of the state volume (mounted at /var/lib/wayang here, by sub-path in the daemons):
#   keys/                     every public key and its scope: each daemon's WAYANG_KEY_DIR
#   identities/<id>/amqp.env  WAYANG_AMQP_URL=<its account's URL on every node> (0600)
#   identities/<id>/signing.key  its private key: its WAYANG_SIGNING_KEY (0600)
# Run again (every `docker compose up`), it changes nothing that exists: accounts keep their
# passwords and permissions are re-applied, keys stay. Delete identities/<id> to re-issue one.
set -eu

state=/var/lib/wayang
nodes="rabbitmq-0 rabbitmq-1 rabbitmq-2"
umask 077

echo "==> waiting for a 3-node RabbitMQ cluster"
python - <<'PY'
import base64, json, os, time, urllib.parse, urllib.request

url = urllib.parse.urlsplit(os.environ["WAYANG_AMQP_URL"])
auth = base64.b64encode(f"{url.username}:{urllib.parse.unquote(url.password)}".encode()).decode()
request = urllib.request.Request(
    os.environ["WAYANG_MANAGEMENT_URL"] + "/api/nodes", headers={"Authorization": "Basic " + auth}
)
deadline = time.monotonic() + 300
while True:
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            running = [n["name"] for n in json.load(answer) if n.get("running")]
    except OSError as exc:
        running = [f"({exc})"]
    if len(running) >= 3:
        print("cluster:", ", ".join(sorted(running)))
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"the cluster did not form within 300 s: {running}")
    time.sleep(2)
PY

echo "==> topology"
wayang-mq topology apply
echo "==> database schema"
wayang-mq db migrate

mkdir -p "$state/keys" "$state/identities"

# identity ROLE ID CAPABILITY... : the broker account and signing key of one daemon.
identity() {
    role=$1 id=$2
    shift 2
    dir="$state/identities/$id"
    grant_caps="" key_caps=""
    for cap in "$@"; do
        grant_caps="$grant_caps --capability $cap"
        key_caps="$key_caps --capability $cap"
    done
    mkdir -p "$dir"
    if [ -f "$dir/amqp.env" ]; then
        # shellcheck disable=SC2086  # the flags are words on purpose
        wayang-mq access grant "$role" "$id" $grant_caps
    else
        # shellcheck disable=SC2086
        wayang-mq access grant "$role" "$id" $grant_caps --new-password --password-file "$dir/password"
        password=$(cat "$dir/password")
        urls=""
        for node in $nodes; do
            # every node, comma-separated: the client fails over to the next one (issue 15)
            urls="$urls${urls:+,}amqp://$id:$password@$node:5672/"
        done
        printf 'WAYANG_AMQP_URL=%s\n' "$urls" >"$dir/amqp.env.partial"
        mv "$dir/amqp.env.partial" "$dir/amqp.env"
        rm -f "$dir/password"
    fi
    if [ ! -f "$dir/signing.key" ]; then
        rm -rf "$dir/new"
        # shellcheck disable=SC2086
        wayang-mq keys new --dir "$dir/new" --role "$role" --id "$id" $key_caps
        mv "$dir"/new/*.toml "$state/keys/"
        mv "$dir"/new/*.pub "$state/keys/"  # the .pub last: readers never see it without scope
        mv "$dir"/new/*.key "$dir/signing.key"
        rmdir "$dir/new"
    fi
}

echo "==> identities"
identity executor demo demo.echo demo.sleep demo.fail
identity executor http-call http.call
identity reaper reaper
identity control-plane control-plane
# `docker compose run --rm cli submit ...` dispatches as this one (every capability)
identity dispatcher cli
chmod -R go-rwx "$state/identities"
chmod 0755 "$state/keys" && chmod 0644 "$state/keys"/*
echo "==> bootstrap done"
