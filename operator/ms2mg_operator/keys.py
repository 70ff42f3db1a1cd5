"""Every label and annotation key the operator writes or selects on, in one place.

Keys under the operator's own prefix (`MS2MG_LABEL_PREFIX`, default `ms2mg.io`) come from `Keys(prefix)`; the
well-known Kubernetes and Kueue keys are constants. The Job renderer, the watches' selectors, the indexes and the
controller all take their keys from here, so a key cannot be spelled two ways.
"""

from __future__ import annotations

from dataclasses import dataclass

MANAGED_BY = "ms2mg-operator"
"""Value of `app.kubernetes.io/managed-by` on the operator's Jobs and pods (the watches select on it)."""
APP_NAME = "ms2mg"
COMPONENT = "converter"

NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"

MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
"""Server-side label selector of the Job and pod watches."""


@dataclass(frozen=True)
class Keys:
    """The keys under the operator's prefix."""

    prefix: str = "ms2mg.io"

    @property
    def conversion(self) -> str:
        """Label: the resource's name (shortened to a valid label value when needed)."""
        return f"{self.prefix}/conversion"

    @property
    def conversion_uid(self) -> str:
        """Label: the resource's uid; the indexes key Jobs and pods by it."""
        return f"{self.prefix}/conversion-uid"

    @property
    def generation(self) -> str:
        """Label: the resource generation a Job (and its pods) runs."""
        return f"{self.prefix}/generation"

    @property
    def conversion_name(self) -> str:
        """Pod annotation: the resource's full name (names may exceed a label value's 63 characters)."""
        return f"{self.prefix}/conversion-name"

    @property
    def finalizer(self) -> str:
        """kopf's finalizer name. The operator needs no finalizer; kopf removes this one from resources an
        older operator version left it on."""
        return f"{self.prefix}/kopf-finalizer"

    @property
    def last_handled(self) -> str:
        """Annotation key (below the prefix) of kopf's diff base."""
        return "last-handled-configuration"
