// Package routes validates the Gateway API routes attached to services
// (GAMMA) and fedmesh's traffic policies, writes their status, and compiles
// them into package policy's Service for the discovery API.
package routes

import (
	_ "sigs.k8s.io/gateway-api/apis/v1"
	_ "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	_ "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"
)
