#!/bin/sh
# Makes a private CA and a serving certificate for the admission Service, stores them in
# Secret pullgate-system/pullgate-admission-tls and puts the CA into every webhook's caBundle.
# For clusters without cert-manager (with it: kubectl apply -k deploy/cert-manager/).
#
# Safe to re-run, e.g. daily from cron: while the certificate in the Secret has more than
# RENEW_DAYS (30) days left and verifies against the webhooks' caBundle, nothing is changed.
# Otherwise a new CA and certificate are made; the caBundle then holds the new CA *and* the
# previous one, so the API server accepts the shim's old certificate until the shim has
# reloaded the new one (it re-reads its certificate files when they change).
# Needs: openssl, kubectl (pointing at the cluster), deploy/ already applied.
set -eu
NS=pullgate-system
SVC=pullgate-admission
SECRET=pullgate-admission-tls
DAYS=${DAYS:-365}
RENEW_DAYS=${RENEW_DAYS:-30}
KUBECTL=${KUBECTL:-kubectl}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
k() { "$KUBECTL" "$@"; }

# --- still good? ------------------------------------------------------------------------------
bundle=$(k get validatingwebhookconfiguration pullgate \
  -o jsonpath='{.webhooks[0].clientConfig.caBundle}' 2>/dev/null || true)
printf '%s' "$bundle" | base64 -d > "$dir/old-bundle.crt" 2>/dev/null || : > "$dir/old-bundle.crt"
current=$(k -n "$NS" get secret "$SECRET" -o jsonpath='{.data.tls\.crt}' 2>/dev/null || true)
printf '%s' "$current" | base64 -d > "$dir/current.crt" 2>/dev/null || : > "$dir/current.crt"
if [ -s "$dir/current.crt" ] && [ -s "$dir/old-bundle.crt" ] \
  && openssl x509 -in "$dir/current.crt" -noout -checkend $((RENEW_DAYS * 86400)) >/dev/null 2>&1 \
  && openssl verify -CAfile "$dir/old-bundle.crt" "$dir/current.crt" >/dev/null 2>&1; then
  until=$(openssl x509 -in "$dir/current.crt" -noout -enddate | cut -d= -f2)
  echo "pullgate-admission TLS is valid until $until (more than $RENEW_DAYS days): left as it is"
  exit 0
fi

# --- a new CA and serving certificate ---------------------------------------------------------
openssl req -x509 -newkey rsa:3072 -nodes -days "$DAYS" -subj "/CN=pullgate-admission-ca" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
cat > "$dir/ext.cnf" <<EXT
subjectAltName = DNS:$SVC.$NS.svc, DNS:$SVC.$NS.svc.cluster.local
extendedKeyUsage = serverAuth
EXT
openssl req -newkey rsa:3072 -nodes -subj "/CN=$SVC.$NS.svc" \
  -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$DAYS" -extfile "$dir/ext.cnf" -out "$dir/tls.crt" 2>/dev/null

# The new CA first, then the previous one (only the first, so the bundle does not grow), while
# it has not expired.
cp "$dir/ca.crt" "$dir/bundle.crt"
if [ -s "$dir/old-bundle.crt" ] && openssl x509 -in "$dir/old-bundle.crt" -out "$dir/previous.crt" 2>/dev/null \
  && openssl x509 -in "$dir/previous.crt" -noout -checkend 0 >/dev/null 2>&1 \
  && ! cmp -s "$dir/previous.crt" "$dir/ca.crt"; then
  cat "$dir/previous.crt" >> "$dir/bundle.crt"
fi

# caBundle first (old and new CA accepted), then the Secret the shim serves from.
bundle=$(base64 < "$dir/bundle.crt" | tr -d '\n')
for kind in validatingwebhookconfiguration mutatingwebhookconfiguration; do
  count=$(k get "$kind" pullgate -o jsonpath='{range .webhooks[*]}x{end}' | wc -c)
  i=0
  while [ "$i" -lt "$count" ]; do
    k patch "$kind" pullgate --type=json \
      -p "[{\"op\":\"add\",\"path\":\"/webhooks/$i/clientConfig/caBundle\",\"value\":\"$bundle\"}]"
    i=$((i + 1))
  done
done
k -n "$NS" create secret tls "$SECRET" \
  --cert "$dir/tls.crt" --key "$dir/tls.key" --dry-run=client -o yaml | k apply -f -
echo "pullgate-admission TLS installed; valid for $DAYS days, renewed by a re-run within $RENEW_DAYS days of expiry"
