"""ServingIdentity: a private CA, the server's certificate and the bearer tokens of one model service.

The hybrid stack's edge devices send their least confident inputs to the cloud teacher across the
internet. They verify the teacher against this CA (and trust nothing else), and present the
inference token; Prometheus reads ``/metrics`` with the separate metrics token, which can call
nothing else. Everything is made by Pulumi's ``tls`` and ``random`` providers and kept in the
stack's state as secrets, so no key file is handled by hand and a re-run changes nothing:

- the CA: an ECDSA P-256 key and a self-signed certificate, valid ten years;
- the server: its own key and a certificate for the Service's in-cluster names and the NLB's
  Elastic IPs, valid one year and renewed by the first ``pulumi up`` in its last 30 days (the
  credentials Secret changes, and the pods roll through their checksum annotation);
- two 48-character random tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_random as random
import pulumi_tls as tls

from components.model_service import ServingCredentials

CA_VALIDITY_HOURS = 10 * 365 * 24
SERVER_VALIDITY_HOURS = 365 * 24
SERVER_EARLY_RENEWAL_HOURS = 30 * 24
TOKEN_LENGTH = 48


@dataclass
class ServingIdentityArgs:
    """Inputs of :class:`ServingIdentity`."""

    common_name: str
    """The server certificate's subject (the service's in-cluster name)."""

    dns_names: Sequence[str]
    """Names the server certificate carries (the in-cluster Service names)."""

    ip_addresses: pulumi.Input[Sequence[str]] = ()
    """Addresses it carries: the NLB's Elastic IPs, which the edge devices connect to."""

    organization: str = "dualdeploy"
    """The subjects' organisation."""


class ServingIdentity(pulumi.ComponentResource):
    """A private CA, a server certificate it signed, and an inference and a metrics token.

    Attributes:
        credentials: what :class:`~components.model_service.ModelService` mounts.
        ca_pem: the CA certificate (public; the edge devices trust it).
        token: the inference token (secret).
    """

    credentials: ServingCredentials
    ca_pem: pulumi.Output[str]
    token: pulumi.Output[str]

    def __init__(
        self, name: str, args: ServingIdentityArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        """Declare the keys, certificates and tokens.

        Raises:
            ValueError: ``common_name`` is empty.
        """
        if not args.common_name:
            raise ValueError("ServingIdentityArgs.common_name must not be empty")
        super().__init__("dualdeploy:serving_identity:ServingIdentity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        ca_key = tls.PrivateKey(f"{name}-ca-key", algorithm="ECDSA", ecdsa_curve="P256", opts=child)
        ca = tls.SelfSignedCert(
            f"{name}-ca",
            private_key_pem=ca_key.private_key_pem,
            subject=tls.SelfSignedCertSubjectArgs(
                common_name=f"{args.common_name} CA", organization=args.organization
            ),
            is_ca_certificate=True,
            validity_period_hours=CA_VALIDITY_HOURS,
            allowed_uses=["cert_signing", "crl_signing"],
            opts=child,
        )
        server_key = tls.PrivateKey(f"{name}-key", algorithm="ECDSA", ecdsa_curve="P256", opts=child)
        request = tls.CertRequest(
            f"{name}-csr",
            private_key_pem=server_key.private_key_pem,
            subject=tls.CertRequestSubjectArgs(common_name=args.common_name, organization=args.organization),
            dns_names=list(args.dns_names),
            ip_addresses=args.ip_addresses,
            opts=child,
        )
        server = tls.LocallySignedCert(
            f"{name}-cert",
            cert_request_pem=request.cert_request_pem,
            ca_private_key_pem=ca_key.private_key_pem,
            ca_cert_pem=ca.cert_pem,
            validity_period_hours=SERVER_VALIDITY_HOURS,
            early_renewal_hours=SERVER_EARLY_RENEWAL_HOURS,
            allowed_uses=["digital_signature", "key_encipherment", "server_auth"],
            opts=child,
        )
        token = random.RandomPassword(f"{name}-token", length=TOKEN_LENGTH, special=False, opts=child)
        metrics_token = random.RandomPassword(
            f"{name}-metrics-token", length=TOKEN_LENGTH, special=False, opts=child
        )

        self.ca_pem = ca.cert_pem
        self.token = pulumi.Output.secret(token.result)
        self.credentials = ServingCredentials(
            cert_pem=server.cert_pem,
            key_pem=pulumi.Output.secret(server_key.private_key_pem),
            ca_pem=ca.cert_pem,
            token=self.token,
            metrics_token=pulumi.Output.secret(metrics_token.result),
        )
        self.register_outputs({"ca_pem": self.ca_pem, "token": self.token})
