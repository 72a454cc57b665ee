# Shared helpers for the benchmark scripts (sourced, not run): free ports, medians, Prometheus scraping,
# and a throwaway PKI for the mqtt upstream.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# median: the median of the numbers on stdin, one a line (exit 1 when there are none).
median() { sort -n | awk '{v[NR] = $1} END { if (NR == 0) exit 1; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# metric NAME: the value of an unlabelled metric on the admin listener at $ADMIN.
metric() { curl -s "http://127.0.0.1:$ADMIN/metrics" | awk -v m="$1" '$1==m {print $2}'; }

# make_certs DIR: ca.pem, server.pem/key (localhost, 127.0.0.1), client.pem/key. X.509 v3
# (rustls refuses v1). Keys world-readable: mosquitto drops to its own user.
make_certs() {
    local dir="$1"
    cat > "$dir/ext.cnf" <<'CNF'
[srv]
subjectAltName=DNS:localhost,IP:127.0.0.1
basicConstraints=CA:FALSE
extendedKeyUsage=serverAuth
[cli]
basicConstraints=CA:FALSE
extendedKeyUsage=clientAuth
CNF
    (
        cd "$dir"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=bench CA"
        for who in server client; do
            openssl req -newkey rsa:2048 -nodes -keyout $who.key -out $who.csr -subj "/CN=$who"
            ext=srv; [[ $who == client ]] && ext=cli
            openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.pem \
                -days 2 -extfile ext.cnf -extensions $ext
        done
        chmod 644 ./*.key
    ) >/dev/null 2>&1
}
