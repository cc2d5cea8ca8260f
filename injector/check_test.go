package injector

import (
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/fedmesh/fedmesh/sidecar/appprobe"
)

// checkInjected reports what is missing from an injected pod, comparing it
// with the pod before injection.
func checkInjected(got, before *corev1.Pod, cfg Config) error {
	if got.Annotations[AnnotationInjected] != "true" {
		return fmt.Errorf("annotation %s missing", AnnotationInjected)
	}
	if len(got.Spec.InitContainers) != len(before.Spec.InitContainers)+1 || got.Spec.InitContainers[0].Name != InitName {
		return fmt.Errorf("init container %s not first: %d init containers", InitName, len(got.Spec.InitContainers))
	}
	ic := got.Spec.InitContainers[0]
	if ic.Image != cfg.InitImage || !slices.Equal(ic.Command, []string{InitCommand}) || !slices.Contains(ic.Args, fmt.Sprintf("--outbound-port=%d", cfg.OutboundPort)) ||
		ic.SecurityContext == nil || ic.SecurityContext.Capabilities == nil || !slices.Equal(ic.SecurityContext.Capabilities.Add, []corev1.Capability{"NET_ADMIN"}) {
		return fmt.Errorf("init container wrong: %+v", ic)
	}
	if len(got.Spec.Containers) != len(before.Spec.Containers)+1 {
		return fmt.Errorf("%d containers, want %d", len(got.Spec.Containers), len(before.Spec.Containers)+1)
	}
	sc := got.Spec.Containers[len(got.Spec.Containers)-1]
	if sc.Name != SidecarName || sc.Image != cfg.SidecarImage || len(sc.Command) == 0 || sc.Command[0] != cfg.SidecarCommand[0] {
		return fmt.Errorf("last container is %s (%s), want %s (%s)", sc.Name, sc.Image, SidecarName, cfg.SidecarImage)
	}
	if !slices.Contains(ic.Args, fmt.Sprintf("--probe-port=%d", cfg.ProbePort)) {
		return fmt.Errorf("init arguments %q do not exempt the probe port %d", ic.Args, cfg.ProbePort)
	}
	if rp := sc.ReadinessProbe; rp == nil || rp.HTTPGet == nil || rp.HTTPGet.Path != appprobe.ReadyPath || rp.HTTPGet.Port.IntValue() != int(cfg.ProbePort) {
		return fmt.Errorf("sidecar readiness probe %+v, want GET %s on port %d", rp, appprobe.ReadyPath, cfg.ProbePort)
	}
	if !slices.Contains(sc.Env, corev1.EnvVar{Name: appprobe.EnvAddr, Value: fmt.Sprintf(":%d", cfg.ProbePort)}) {
		return fmt.Errorf("sidecar env %+v lacks %s=:%d", sc.Env, appprobe.EnvAddr, cfg.ProbePort)
	}
	dnsEnv := corev1.EnvVar{Name: EnvDNSAddr, Value: fmt.Sprintf("localhost:%d", cfg.DNSPort)}
	if capture := !cfg.NoDNSCapture; slices.Contains(sc.Env, dnsEnv) != capture || slices.Contains(ic.Args, "--no-dns-capture") == capture {
		return fmt.Errorf("dns capture %v, but sidecar env %+v and init arguments %q", capture, sc.Env, ic.Args)
	}
	wantSock := "unix://" + cfg.SocketDir + "/" + cfg.SocketName
	if len(sc.Env) == 0 || sc.Env[0].Name != SocketEnv || sc.Env[0].Value != wantSock {
		return fmt.Errorf("sidecar env %+v, want %s=%s", sc.Env, SocketEnv, wantSock)
	}
	if len(sc.VolumeMounts) != 1 || sc.VolumeMounts[0].Name != SocketVolume || sc.VolumeMounts[0].MountPath != cfg.SocketDir {
		return fmt.Errorf("sidecar mounts %+v", sc.VolumeMounts)
	}
	var vol *corev1.Volume
	for i := range got.Spec.Volumes {
		if got.Spec.Volumes[i].Name == SocketVolume {
			vol = &got.Spec.Volumes[i]
		}
	}
	switch {
	case vol == nil:
		return fmt.Errorf("volume %s missing", SocketVolume)
	case len(got.Spec.Volumes) != len(before.Spec.Volumes)+1:
		return fmt.Errorf("%d volumes, want %d", len(got.Spec.Volumes), len(before.Spec.Volumes)+1)
	case cfg.SocketSource == SocketCSI && (vol.CSI == nil || vol.CSI.Driver != cfg.CSIDriver):
		return fmt.Errorf("volume is not CSI %s: %+v", cfg.CSIDriver, vol.VolumeSource)
	case cfg.SocketSource == SocketHostPath && (vol.HostPath == nil || vol.HostPath.Path != cfg.SocketDir):
		return fmt.Errorf("volume is not hostPath %s: %+v", cfg.SocketDir, vol.VolumeSource)
	}
	for k, v := range before.Annotations {
		if got.Annotations[k] != v {
			return fmt.Errorf("annotation %s lost", k)
		}
	}
	return nil
}
