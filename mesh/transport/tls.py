"""Mutual TLS between EdgeMesh processes, keyed from the cluster key alone.

No one manages certificates. Every process derives the same cluster CA from the cluster key
(its private key is a function of the key, its name carries the public cluster hash), mints
a fresh leaf certificate for itself at start, signs it with that CA, and trusts only leaves
that chain to it. A node's leaf names its node id and NODE_NAME; a client (a gateway, a
command, a test) gets a leaf without NODE_NAME, so it can call nodes but cannot pose as one.

What it buys: prompts, hidden states and tokens cross the LAN encrypted (TLS 1.3 on the
step socket; gRPC negotiates 1.3 between two EdgeMesh ends, it cannot be told to refuse 1.2
from other clients); a peer without the cluster key cannot complete a handshake in either
direction; a caller that knows which node it wants (a pipeline head reaching its stage,
membership after mDNS named the node) checks that the certificate names that node. What it
does not: anyone who holds the cluster key can mint a certificate for any name, so the key
stays the one secret of a mesh (as it already was for the HMAC signatures in
mesh.transport.auth, which stay as a second check bound to each request body).

Plain text only with --insecure-plaintext, and only on loopback (for debugging with a packet
capture); both ends must say it.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import secrets
import ssl
import tempfile
import threading
from dataclasses import dataclass
from functools import cached_property

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.config import is_loopback
from mesh.errors import ConfigError
from mesh.transport.auth import cluster_hash

log = logging.getLogger(__name__)

# Every node's certificate names this as well as its node id, so a caller that does not yet
# know the node id (a static --peer address) still refuses a peer that is not a node.
NODE_NAME = "node.edgemesh.invalid"
_CA_VALID_FROM = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
_CA_VALID_TO = datetime.datetime(2124, 1, 1, tzinfo=datetime.timezone.utc)
# A leaf lives as long as its process; the margin before now covers peers whose clocks lag.
_LEAF_BACKDATE = datetime.timedelta(days=1)
_LEAF_LIFETIME = datetime.timedelta(days=3650)
_CURVE = ec.SECP256R1()
# secp256r1's group order: the CA's private scalar is reduced into [1, n-1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def cluster_ca_key(cluster_key: str) -> ec.EllipticCurvePrivateKey:
    """The CA's private key: the same in every process that holds the cluster key."""
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=b"edgemesh cluster ca",
               info=b"p256 v1").derive(cluster_key.encode())
    scalar = int.from_bytes(okm, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, _CURVE)


def _ca_name(cluster_key: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeMesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"EdgeMesh cluster {cluster_hash(cluster_key)}")])


def _ca_certificate(cluster_key: str, ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The cluster CA. Each process builds its own copy: the copies share name, key and
    extensions, so a leaf signed by any of them verifies against all."""
    name = _ca_name(cluster_key)
    public = ca_key.public_key()
    serial = int.from_bytes(hashlib.sha256(public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()[:16], "big") >> 1
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public).serial_number(serial or 1)
            .not_valid_before(_CA_VALID_FROM).not_valid_after(_CA_VALID_TO)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _leaf(cluster_key: str, identity: str, node: bool) -> tuple[bytes, bytes, bytes]:
    """(CA, leaf certificate, leaf key) as PEM for one process."""
    ca_key = cluster_ca_key(cluster_key)
    ca = _ca_certificate(cluster_key, ca_key)
    key = ec.generate_private_key(_CURVE)
    names: list[x509.GeneralName] = [x509.DNSName(identity)]
    if node:
        names.append(x509.DNSName(NODE_NAME))
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _LEAF_BACKDATE).not_valid_after(now + _LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), leaf.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@dataclass(frozen=True)
class ClusterCredentials:
    """This process's certificate in the mesh of one cluster key, and the CA it trusts."""

    identity: str  # the leaf's name: a node id, or client-<random>
    is_node: bool
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def mint(cls, cluster_key: str, identity: str, *, node: bool) -> ClusterCredentials:
        ca, cert, key = _leaf(cluster_key, identity, node)
        return cls(identity=identity, is_node=node, ca_pem=ca, cert_pem=cert, key_pem=key)

    def grpc_server(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    @cached_property
    def grpc_channel(self) -> grpc.ChannelCredentials:
        """For every channel to a node (one object, shared by all of them)."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    @cached_property
    def server_context(self) -> ssl.SSLContext:
        """For the step socket's listener: TLS 1.3, a client certificate of this cluster required."""
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    @cached_property
    def client_context(self) -> ssl.SSLContext:
        """For a step connection: TLS 1.3, check_hostname on, so pass server_hostname=<node id>
        to wrap_socket. Shared: do not change it."""
        return self._context(ssl.PROTOCOL_TLS_CLIENT)

    def _context(self, protocol: ssl._SSLMethod) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.ca_pem.decode())
        # ssl loads a key pair only from files: a private directory that lives for the call.
        with tempfile.TemporaryDirectory(prefix="edgemesh-tls-") as folder:
            cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            for path, data in ((cert_path, self.cert_pem), (key_path, self.key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            context.load_cert_chain(cert_path, key_path)
        return context


class _Registry:
    """This process's credentials per cluster key (a process serves one mesh, tests several),
    and whether it runs in plain text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, ClusterCredentials] = {}
        self._plaintext = False

    def establish(self, cluster_key: str, identity: str, *, node: bool) -> ClusterCredentials:
        with self._lock:
            held = self._by_key.get(cluster_key)
            if held is not None and held.identity == identity and held.is_node == node:
                return held
            credentials = ClusterCredentials.mint(cluster_key, identity, node=node)
            self._by_key[cluster_key] = credentials
            return credentials

    def get(self, cluster_key: str) -> ClusterCredentials | None:
        if self._plaintext:
            return None
        with self._lock:
            held = self._by_key.get(cluster_key)
        if held is not None:
            return held
        return self.establish(cluster_key, f"client-{secrets.token_hex(6)}", node=False)

    def set_plaintext(self, on: bool) -> None:
        self._plaintext = on


_registry = _Registry()


def establish_node(cluster_key: str, node_id: str) -> ClusterCredentials:
    """A node's credentials, minted at its start, before it serves or calls anyone."""
    return _registry.establish(cluster_key, node_id, node=True)


def credentials_for(cluster_key: str) -> ClusterCredentials | None:
    """This process's credentials for the cluster (a client leaf, minted on first use unless
    the process is a node), or None when it runs --insecure-plaintext."""
    return _registry.get(cluster_key)


def use_plaintext(host: str, on: bool) -> None:
    """--insecure-plaintext: refused anywhere but loopback, where no one else can listen."""
    if on and not is_loopback(host):
        raise ConfigError(f"--insecure-plaintext is only for debugging on loopback, not on {host}: "
                          "node traffic between devices is always TLS")
    if on:
        log.warning("--insecure-plaintext: node traffic is NOT encrypted (debugging only)")
    _registry.set_plaintext(on)


def expected_name(node_id: str | None) -> str:
    """The name a caller checks in a node's certificate: its id when known, else any node."""
    return node_id or NODE_NAME
