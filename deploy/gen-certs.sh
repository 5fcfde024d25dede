#!/bin/sh
# Makes a self-signed CA and a serving certificate for the admission Service, stores them in
# Secret pullgate-system/pullgate-admission-tls and puts the CA into both webhook
# configurations' caBundle. For clusters without cert-manager; re-run to rotate (the shim
# re-reads its certificate files when they change).
# Needs: openssl, kubectl (pointing at the cluster), deploy/ already applied.
set -eu
NS=pullgate-system
SVC=pullgate-admission
DAYS=${DAYS:-365}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

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

kubectl -n "$NS" create secret tls pullgate-admission-tls \
  --cert "$dir/tls.crt" --key "$dir/tls.key" --dry-run=client -o yaml | kubectl apply -f -
bundle=$(base64 < "$dir/ca.crt" | tr -d '\n')
for kind in validatingwebhookconfiguration mutatingwebhookconfiguration; do
  count=$(kubectl get "$kind" pullgate -o jsonpath='{range .webhooks[*]}x{end}' | wc -c)
  i=0
  while [ "$i" -lt "$count" ]; do
    kubectl patch "$kind" pullgate --type=json \
      -p "[{\"op\":\"add\",\"path\":\"/webhooks/$i/clientConfig/caBundle\",\"value\":\"$bundle\"}]"
    i=$((i + 1))
  done
done
echo "pullgate-admission TLS installed; CA valid for $DAYS days"
