package gateway

// crash stops the gateway like a killed process: its sockets close without
// a CONNECTION_CLOSE, so peers only notice through silence.
func (g *Gateway) crash() {
	_ = g.tunnelConn.Close()
	if g.egressConn != nil {
		_ = g.egressConn.Close()
		_ = g.egressTCP.Close()
	}
}
